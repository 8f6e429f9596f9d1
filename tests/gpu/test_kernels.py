"""The learner's CUDA paths against plain references: the kept-logits LM head in bf16, packed
(flash variable-length) attention against padding, and compiled decoder layers against eager."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.modeling import packing
from opd.modeling.compile import compile_layers
from opd.modeling.head_logprob import HeadLogProb
from opd.modeling.logprobs import final_hidden, gather_positions, token_logprobs

CUDA = torch.device("cuda")


def test_head_logprob_in_bf16_matches_an_fp32_log_softmax():
    g = torch.Generator(device=CUDA).manual_seed(0)
    N, H, V = 300, 256, 4099  # a short last chunk, a vocabulary that is not a multiple of 8
    h = torch.randn(N, H, device=CUDA, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device=CUDA, generator=g) / H**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device=CUDA, generator=g)
    up = torch.randn(N, device=CUDA, generator=g)

    lp = HeadLogProb.apply(h, w, t, 128)
    (lp * up).sum().backward()
    got = (lp.detach(), h.grad.float(), w.grad.float())

    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    ref = torch.log_softmax(h32 @ w32.t(), -1).gather(-1, t[:, None])[:, 0]
    (ref * up).sum().backward()
    assert lp.dtype == torch.float32
    # bf16 logits (8 bits of mantissa) against fp32 ones: errors of a few 1e-2 at most
    assert (got[0] - ref.detach()).abs().max() < 5e-2
    for a, b in ((got[1], h32.grad), (got[2], w32.grad)):
        assert (a - b).norm() / b.norm() < 2e-2


@pytest.fixture(scope="module")
def model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.bfloat16).to(CUDA)


def _batch(vocab: int):
    """Three rows of different lengths, right-padded, and each row's completion positions."""
    g = torch.Generator().manual_seed(1)
    lengths = [37, 12, 25]
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    T = 8  # the last 8 tokens of each row are "completion"
    positions = torch.stack([torch.arange(n - T - 1, n - 1) for n in lengths])
    targets = torch.stack([ids[i, n - T : n] for i, n in enumerate(lengths)])
    return ids.to(CUDA), mask.to(CUDA), positions.to(CUDA), targets.to(CUDA)


def _logprobs_and_grads(model, batch):
    ids, mask, positions, targets = batch
    model.zero_grad()
    hidden = gather_positions(final_hidden(model, ids, mask), positions)
    lp, _ = token_logprobs(model, hidden, targets, chunk=16)
    lp.float().sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return lp.detach().float(), grads


def test_packed_flash_attention_equals_padding(model):
    batch = _batch(model.config.vocab_size)
    assert packing.packable(model)
    packed = _logprobs_and_grads(model, batch)
    with packing.padded():
        padded = _logprobs_and_grads(model, batch)
    assert (packed[0] - padded[0]).abs().max() < 3e-2
    for name, g in padded[1].items():
        assert (packed[1][name] - g).norm() <= 3e-2 * g.norm() + 1e-6, name


def test_compiled_layers_match_eager(model):
    """In fp32, where the two agree to rounding (in bf16 one ulp of a logit near 10 is 0.06)."""
    model = copy.deepcopy(model).float()
    batch = _batch(model.config.vocab_size)
    eager = _logprobs_and_grads(model, batch)
    compiled_model = copy.deepcopy(model)
    assert compile_layers(compiled_model) == model.config.num_hidden_layers
    compiled = _logprobs_and_grads(compiled_model, batch)
    assert (compiled[0] - eager[0]).abs().max() < 1e-3
    for name, g in eager[1].items():
        assert (compiled[1][name] - g).norm() <= 1e-3 * g.norm() + 1e-6, name
