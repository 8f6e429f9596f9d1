"""Padding-free forward passes: the rows of a right-padded batch packed into one sequence.

`packed_hidden` drops the padding, runs the decoder once over the concatenated sequences
(`position_ids` restart at 0 for each; attention stays inside each sequence through
variable-length attention with cumulative sequence lengths) and puts the hidden states back
into the padded [B, L, H] layout, zeros at the pads. No FLOPs are spent on padding, and the
matrix products see one long [N, H] operand instead of B short ones.

Attention is registered in transformers' `AttentionInterface` as `opd_varlen`, and a packable
model (whose attention was `sdpa`) is switched to it for good: a call that carries the packed
sequence lengths (`cu_seq_lens_q`) runs variable-length attention, any other call is handed to
`sdpa` with the mask `sdpa` would get, so padded calls and generation are unchanged. (Switching
only around the packed forward is not enough: activation checkpointing recomputes each layer
during backward, outside such a window.) On CUDA it is the flash-attention kernel that ships with
PyTorch (`aten._flash_attention_forward/_backward` with `cu_seqlens`, native grouped-query
heads when the kernel accepts them, else repeated key/value heads); elsewhere, and for dtypes
or head sizes that kernel does not take, a loop of causal SDPA calls, one per sequence.
Only decoder families whose attention is plain causal over the whole sequence are packed
(`PACKABLE_TYPES`, no sliding windows); others keep the padded path. Within `padded()` every
forward takes the padded path, for comparing the two.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "opd_varlen"
PACKABLE_TYPES = {"llama", "qwen2", "qwen3", "mistral"}
_padded_only = False  # set inside `padded()`
_native_gqa: bool | None = None  # does the flash kernel take fewer key/value heads? (probed)


class _FlashVarlen(torch.autograd.Function):
    """Causal flash attention over packed sequences: q [N, Hq, D], k and v [N, Hk, D]."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng, unused)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            ctx.max_len,
            ctx.max_len,
            0.0,
            True,
            rng,
            unused,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


def _probe_native_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """One tiny forward + backward with 4 query heads on 2 key/value heads. Run before the
    model's forward, never inside it: inside an activation-checkpointed layer its saved tensors
    would make the recomputation differ from the first pass."""
    try:
        q = torch.randn(8, 4, 64, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(8, 2, 64, device=device, dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        _FlashVarlen.apply(q, kv, kv, cu, 5, 0.125).sum().backward()
        return kv.grad is not None and kv.grad.shape == kv.shape
    except RuntimeError:
        return False


def _flash(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if not _native_gqa:  # probed by `packed_hidden` before the forward
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _FlashVarlen.apply(q, k.contiguous(), v.contiguous(), cu, max_len, scale)


def _sdpa_segments(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float) -> Tensor:
    """Reference path: causal SDPA on each sequence; [N, H, D] in and out."""
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention function: query [1, Hq, N, D], key/value [1, Hk, N, D] for a
    packed call; any other call goes to `sdpa` unchanged."""
    if kw.get("cu_seq_lens_q") is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw
        )
    cu, max_len = kw["cu_seq_lens_q"], kw["max_length_q"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    out = _flash(q, k, v, cu, max_len, scale) if flash else _sdpa_segments(q, k, v, cu, scale)
    return out.unsqueeze(0), None


_packed_call = False  # inside a packed forward: no mask is built


def varlen_mask(*args, **kwargs):
    """The mask `sdpa` would get, except during a packed forward (sequences are separated by
    `cu_seq_lens_q` there, and a [N, N] mask would cost O(N^2))."""
    if _packed_call:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)


_register()


@contextmanager
def padded():
    """Within it every forward takes the padded path; for comparisons in tests and benchmarks
    (packed against padded results, or timings). The setting in force before is restored on
    exit, so uses nest."""
    global _padded_only
    before, _padded_only = _padded_only, True
    try:
        yield
    finally:
        _padded_only = before


def packable(model) -> bool:
    """Whether `packed_hidden` packs `model`'s batches (False within `padded()`)."""
    cfg = model.config
    if _padded_only or getattr(cfg, "model_type", None) not in PACKABLE_TYPES:
        return False
    if cfg._attn_implementation not in ("sdpa", NAME):
        return False
    if getattr(cfg, "use_sliding_window", False):
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or []))


@contextmanager
def _packed_forward(model):
    global _packed_call
    model.config._attn_implementation = NAME  # for good: see the module docstring
    _packed_call = True
    try:
        yield
    finally:
        _packed_call = False


def pack(attention_mask_BL: Tensor) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """(flat indices of the real tokens in B*L, position ids, cu_seqlens, longest row), or None
    when the mask is not right-padded (then the caller keeps the padded path)."""
    B, L = attention_mask_BL.shape
    mask = attention_mask_BL.bool()
    lengths = mask.sum(1)
    expected = torch.arange(L, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(mask, expected):
        return None
    lens = lengths.tolist()
    index = torch.cat([torch.arange(i * L, i * L + n) for i, n in enumerate(lens)])
    positions = torch.cat([torch.arange(n) for n in lens])
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    d = attention_mask_BL.device
    return index.to(d), positions.to(d), cu.to(d), max(lens)


def packed_hidden(model, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor | None:
    """Last hidden states [B, L, H] (zeros at pads) from one packed pass, or None when the
    batch or the model cannot be packed."""
    if not packable(model):
        return None
    packed = pack(attention_mask_BL)
    if packed is None:
        return None
    index, positions, cu, max_len = packed
    global _native_gqa
    if _native_gqa is None and input_ids_BL.is_cuda:
        dtype = next(model.parameters()).dtype
        if dtype in (torch.float16, torch.bfloat16):
            with torch.enable_grad():
                _native_gqa = _probe_native_gqa(input_ids_BL.device, dtype)
    B, L = input_ids_BL.shape
    ids = input_ids_BL.reshape(-1).index_select(0, index).unsqueeze(0)
    with _packed_forward(model):
        out = model.base_model(
            input_ids=ids,
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max_len,
            max_length_k=max_len,
        )
    hidden_NH = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]
    full = hidden_NH.new_zeros(B * L, hidden_NH.shape[-1]).index_copy(0, index, hidden_NH)
    return full.view(B, L, -1)
