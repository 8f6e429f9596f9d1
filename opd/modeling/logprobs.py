"""Log-probabilities of given tokens from a causal LM, without a full [B, T, V] fp32 tensor.

The decoder runs once, padding-free where the model allows it (`opd.modeling.packing`); the LM
head and the log-softmax run `chunk` positions at a time under activation checkpointing, so
only one chunk's fp32 logits exist at once, in forward and in backward; given a mask, only
the real (unmasked) positions go through the head. Shared by the learner (with grad) and the
teacher scorer (without).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opd.modeling.head_logprob import HeadLogProb
from opd.modeling.packing import packed_hidden


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32 for softmax-type math; leave fp32 and fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def final_hidden(model, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
    """Last hidden states of a transformers CausalLM, before its LM head (zeros at pads when
    the batch ran packed)."""
    packed = packed_hidden(model, input_ids_BL, attention_mask_BL)
    if packed is not None:
        return packed
    out = model.base_model(
        input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model, hidden: Tensor) -> Tensor:
    """LM head plus the output transforms some families apply (soft-capping, scaling)."""
    return _output_transform(model, model.get_output_embeddings()(hidden))


def _output_settings(model) -> tuple[float | None, float | None]:
    """(logit scale, final soft-cap) of the model's family; None where it has none."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return getattr(cfg, "logit_scale", None), getattr(cfg, "final_logit_softcapping", None)


def _output_transform(model, logits: Tensor) -> Tensor:
    scale, cap = _output_settings(model)
    if scale:
        logits = logits * scale
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def fused_head_applies(model, n_tokens: int, cache_bytes: int) -> bool:
    """`HeadLogProb` needs a plain, unpartitioned, bias-free head without output transforms,
    and N x V logits within `cache_bytes`."""
    head = model.get_output_embeddings()
    if head is None or hasattr(head.weight, "ds_id") or getattr(head, "bias", None) is not None:
        return False
    if any(_output_settings(model)):
        return False
    w = head.weight
    return 0 < n_tokens * w.shape[0] * w.element_size() <= cache_bytes


@dataclass
class HeadLogits:
    """Raw logits at chosen positions and tokens, straight from the final hidden states: only
    the asked rows of the LM head are multiplied, so no [B, T, V] tensor is formed.
    (`opd.objectives.base.LogitsAt`; used by cross-tokenizer objectives.)"""

    model: object
    hidden_BTH: Tensor

    def _head(self):
        head = self.model.get_output_embeddings()
        # ZeRO-3 partitions the weight and gathers it only inside the module's own call
        return head, hasattr(head.weight, "ds_id")

    def columns(self, rows_K: Tensor, pos_K: Tensor, vocab_S: Tensor) -> Tensor:
        head, partitioned = self._head()
        h_KH = self.hidden_BTH[rows_K, pos_K]
        if partitioned:
            logits = head(h_KH)[:, vocab_S]
        else:
            bias = head.bias[vocab_S] if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(h_KH, head.weight[vocab_S], bias)
        return _output_transform(self.model, logits)

    def at(self, rows_N: Tensor, pos_N: Tensor, ids_N: Tensor) -> Tensor:
        head, partitioned = self._head()
        h_NH = self.hidden_BTH[rows_N, pos_N]
        if partitioned:
            logits = head(h_NH).gather(-1, ids_N[:, None])[:, 0]
        else:
            logits = (h_NH * head.weight[ids_N]).sum(-1)
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[ids_N]
        return _output_transform(self.model, logits)


def _chunk_logprobs(
    model, hidden: Tensor, targets: Tensor, ids: Tensor | None, temperature: float = 1.0
):
    logits = at_least_fp32(head_logits(model, hidden))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    at_ids = logits.gather(-1, ids) - lse if ids is not None else None
    if temperature != 1.0:
        logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    at_target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
    return at_target, at_ids


def gather_positions(hidden_BLH: Tensor, positions_BT: Tensor) -> Tensor:
    """hidden at the given positions: [B, L, H] x [B, T] -> [B, T, H]."""
    index = positions_BT.unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1])
    return hidden_BLH.gather(1, index)


def token_logprobs(
    model,
    hidden_BTH: Tensor,
    targets_BT: Tensor,
    *,
    ids_BTK: Tensor | None = None,
    chunk: int = 1024,
    mask_BT: Tensor | None = None,
    n_chunks: int | None = None,
    cache_bytes: int = 0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """log p(target) [B, T] and, if `ids_BTK` is given, log p at those ids [B, T, K].
    `temperature` applies to log p(target) only: the sampled tokens' log-probs under the
    distribution they were sampled from, softmax(logits / temperature), as the rollout engine
    reports them; the log-probs at `ids_BTK` are always the model's own (temperature 1).
    With `mask_BT`, only positions where it is non-zero are computed; the others are 0.
    `n_chunks` fixes the number of LM-head calls (some may be empty) instead of `chunk`: under
    ZeRO-3 every head call gathers the head's weight collectively, so all ranks must make the
    same number (`chunks_needed` + a MAX all-reduce gives it). With grad, no `ids_BTK` and
    the logits within `cache_bytes`, the head runs as `HeadLogProb` (its logits kept for
    backward instead of recomputed)."""
    B, T, H = hidden_BTH.shape
    flat_h = hidden_BTH.reshape(B * T, H)
    flat_t = targets_BT.reshape(B * T)
    flat_ids = ids_BTK.reshape(B * T, -1) if ids_BTK is not None else None
    if mask_BT is not None:
        keep = mask_BT.reshape(-1).nonzero().squeeze(1)
        lp_N, lp_NK = token_logprobs(
            model,
            flat_h.index_select(0, keep).unsqueeze(0),
            flat_t.index_select(0, keep).unsqueeze(0),
            ids_BTK=flat_ids.index_select(0, keep).unsqueeze(0) if flat_ids is not None else None,
            chunk=chunk,
            n_chunks=n_chunks,
            cache_bytes=cache_bytes,
            temperature=temperature,
        )
        lp_BT = lp_N.new_zeros(B * T).index_copy(0, keep, lp_N[0]).reshape(B, T)
        lp_BTK = None
        if lp_NK is not None:
            lp_BTK = lp_NK.new_zeros(B * T, lp_NK.shape[-1]).index_copy(0, keep, lp_NK[0])
            lp_BTK = lp_BTK.reshape(B, T, -1)
        return lp_BT, lp_BTK
    outs_t, outs_ids = [], []
    grad = torch.is_grad_enabled() and flat_h.requires_grad
    N = B * T
    if grad and flat_ids is None and n_chunks is None and fused_head_applies(model, N, cache_bytes):
        w = model.get_output_embeddings().weight
        if temperature != 1.0:  # (h / T) W^T = logits / T: the fused path has no transform
            flat_h = flat_h / temperature
        return HeadLogProb.apply(flat_h, w, flat_t, chunk).reshape(B, T), None
    if n_chunks is None:
        bounds = list(range(0, N, chunk)) + [N]
    else:  # n_chunks pieces of near-equal size, the last ones possibly empty
        size = -(-N // n_chunks)
        bounds = [min(N, i * size) for i in range(n_chunks + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        args = (flat_h[a:b], flat_t[a:b], flat_ids[a:b] if flat_ids is not None else None)
        if grad:
            lp_t, lp_ids = checkpoint(
                _chunk_logprobs, model, *args, temperature, use_reentrant=False
            )
        else:
            lp_t, lp_ids = _chunk_logprobs(model, *args, temperature)
        outs_t.append(lp_t)
        outs_ids.append(lp_ids)
    lp_BT = torch.cat(outs_t).reshape(B, T)
    lp_BTK = torch.cat(outs_ids).reshape(B, T, -1) if flat_ids is not None else None
    return lp_BT, lp_BTK


def chunks_needed(n_tokens: int, chunk: int) -> int:
    return max(1, -(-n_tokens // chunk))
