"""Padding-free (packed) forward passes give the padded pass's hidden states and gradients."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from opd.modeling import packing
from opd.modeling.logprobs import final_hidden, gather_positions, token_logprobs


def _model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).double()
    return LlamaForCausalLM(LlamaConfig(**common)).double()


def _batch(lengths: list[int], vocab: int = 97):
    g = torch.Generator().manual_seed(1)
    L = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def _padded(model, ids, mask):
    with packing.padded():
        return final_hidden(model, ids, mask)


def _path(packed: bool):
    """The packed path (the default) or, for `packed=False`, the padded one."""
    return nullcontext() if packed else packing.padded()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_hidden_matches_padded(kind):
    model = _model(kind)
    ids, mask = _batch([7, 3, 12, 1])
    assert packing.packed_hidden(model, ids, mask) is not None
    ref = _padded(model, ids, mask)
    out = final_hidden(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-9, atol=1e-9)
    assert (out[~real] == 0).all()
    # the model now runs `opd_varlen`, which hands unpacked calls to sdpa unchanged
    assert model.config._attn_implementation == packing.NAME
    torch.testing.assert_close(_padded(model, ids, mask)[real], ref[real], rtol=0, atol=0)


def test_packed_gradients_match_padded():
    model = _model("qwen2")
    ids, mask = _batch([9, 4, 6])
    targets = torch.randint(0, 97, (3, 5))
    pos = torch.tensor([[3, 4, 5, 6, 7], [1, 2, 0, 0, 0], [2, 3, 4, 0, 0]])
    tmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).double()

    def loss(packed: bool):
        model.zero_grad()
        with _path(packed):
            h = gather_positions(final_hidden(model, ids, mask), pos)
            lp, _ = token_logprobs(model, h, targets, chunk=4, mask_BT=tmask if packed else None)
        (lp * tmask).sum().backward()
        return (lp * tmask).detach(), [p.grad.clone() for p in model.parameters()]

    lp_ref, g_ref = loss(False)
    lp, g = loss(True)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_left_padding_and_sliding_windows_keep_the_padded_path():
    model = _model("qwen2")
    ids, mask = _batch([5, 3])
    assert packing.packed_hidden(model, ids, mask.flip(1)) is None
    model.config.use_sliding_window = True
    assert packing.packed_hidden(model, ids, mask) is None


def test_packed_gradients_under_activation_checkpointing():
    """Checkpointed layers are recomputed in backward, after the packed forward returned."""
    model = _model("qwen2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = _batch([9, 4, 6])

    def grads(packed: bool):
        model.zero_grad()
        with _path(packed):
            (final_hidden(model, ids, mask) * mask[..., None]).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed, padded = grads(True), grads(False)
    assert len(packed) == len(padded) > 10
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_padded_switches_packing_off_and_restores_it():
    model = _model("qwen2")
    assert packing.packable(model)
    with packing.padded():
        assert not packing.packable(model)
        with packing.padded():
            assert not packing.packable(model)
        assert not packing.packable(model)  # the outer block still holds
    assert packing.packable(model)
    with pytest.raises(RuntimeError), packing.padded():
        raise RuntimeError
    assert packing.packable(model)  # restored on the way out of an error too
