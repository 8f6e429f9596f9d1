"""The LM head's log-probs with a kept-logits backward (`HeadLogProb`) against a plain
log-softmax over the full logits: values and every gradient, and when it is used."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.modeling.head_logprob import HeadLogProb
from opd.modeling.logprobs import fused_head_applies, token_logprobs


def test_values_and_gradients_match_a_full_log_softmax():
    g = torch.Generator().manual_seed(0)
    N, H, V = 11, 6, 23
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, dtype=torch.float64, generator=g)  # any loss of the log-probs

    lp = HeadLogProb.apply(h, w, t, 4)  # chunks of 4, the last one short
    (lp.double() * upstream).sum().backward()
    got = (lp.detach().double(), h.grad.clone(), w.grad.clone())

    h.grad, w.grad = None, None
    ref = torch.log_softmax(h @ w.t(), -1).gather(-1, t[:, None])[:, 0]
    (ref * upstream).sum().backward()
    assert torch.allclose(got[0], ref.detach(), atol=1e-6)  # fp32 log-normalizer
    assert torch.allclose(got[1], h.grad, atol=1e-6)
    assert torch.allclose(got[2], w.grad, atol=1e-6)


@pytest.fixture(scope="module")
def model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32)


def test_token_logprobs_takes_the_fused_path_only_within_budget(model):
    g = torch.Generator().manual_seed(1)
    H = model.config.hidden_size
    V = model.get_output_embeddings().weight.shape[0]
    hidden = torch.randn(2, 5, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    upstream = torch.randn(2, 5, generator=g)

    def run(cache_bytes):
        model.zero_grad()
        hidden.grad = None
        lp, _ = token_logprobs(
            model, hidden, targets, chunk=3, mask_BT=mask, cache_bytes=cache_bytes
        )
        (lp * upstream).sum().backward()
        head = model.get_output_embeddings().weight.grad.clone()
        return lp.detach(), hidden.grad.clone(), head

    fused, plain = run(2**30), run(0)
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, atol=1e-5)
    assert (fused[0] * (1 - mask)).abs().sum() == 0  # masked positions stay 0
    n_real = int(mask.sum())
    assert fused_head_applies(model, n_real, n_real * V * 4)
    assert not fused_head_applies(model, n_real, n_real * V * 4 - 1)  # over budget
    assert not fused_head_applies(model, n_real, 0)
