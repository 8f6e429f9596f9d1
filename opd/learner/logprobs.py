"""Log-probabilities of given tokens from a causal LM, without a full [B, T, V] fp32 tensor.

The decoder runs once; the LM head and the log-softmax run `chunk` positions at a time under
activation checkpointing, so only one chunk's fp32 logits exist at once, in forward and in
backward. Shared by the learner (with grad) and the teacher scorer (without).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opd.objectives.base import at_least_fp32


def final_hidden(model, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
    """Last hidden states of a transformers CausalLM, before its LM head."""
    out = model.base_model(
        input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model, hidden: Tensor) -> Tensor:
    """LM head plus the output transforms some families apply (soft-capping, scaling)."""
    logits = model.get_output_embeddings()(hidden)
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    scale = getattr(cfg, "logit_scale", None)
    if scale:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_logprobs(model, hidden: Tensor, targets: Tensor, ids: Tensor | None):
    logits = at_least_fp32(head_logits(model, hidden))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    at_target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
    at_ids = logits.gather(-1, ids) - lse if ids is not None else None
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
) -> tuple[Tensor, Tensor | None]:
    """log p(target) [B, T] and, if `ids_BTK` is given, log p at those ids [B, T, K]."""
    B, T, H = hidden_BTH.shape
    flat_h = hidden_BTH.reshape(B * T, H)
    flat_t = targets_BT.reshape(B * T)
    flat_ids = ids_BTK.reshape(B * T, -1) if ids_BTK is not None else None
    outs_t, outs_ids = [], []
    grad = torch.is_grad_enabled() and flat_h.requires_grad
    for i in range(0, B * T, chunk):
        args = (
            flat_h[i : i + chunk],
            flat_t[i : i + chunk],
            flat_ids[i : i + chunk] if flat_ids is not None else None,
        )
        if grad:
            lp_t, lp_ids = checkpoint(_chunk_logprobs, model, *args, use_reentrant=False)
        else:
            lp_t, lp_ids = _chunk_logprobs(model, *args)
        outs_t.append(lp_t)
        outs_ids.append(lp_ids)
    lp_BT = torch.cat(outs_t).reshape(B, T)
    lp_BTK = torch.cat(outs_ids).reshape(B, T, -1) if flat_ids is not None else None
    return lp_BT, lp_BTK


def full_logprobs(model, hidden_BTH: Tensor, *, chunk: int = 1024) -> Tensor:
    """log-softmax over the whole vocabulary [B, T, V] (no grad: the teacher's `full` signal)."""
    B, T, H = hidden_BTH.shape
    flat = hidden_BTH.reshape(B * T, H)
    parts = [
        torch.log_softmax(at_least_fp32(head_logits(model, flat[i : i + chunk])), dim=-1)
        for i in range(0, B * T, chunk)
    ]
    return torch.cat(parts).reshape(B, T, -1)
