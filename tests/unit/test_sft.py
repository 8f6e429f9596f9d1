"""The sft baseline: token-sum cross-entropy on reference completions, never on samples."""

import torch

from opd.objectives import LossInputs, build_objective
from opd.signals.sampled import TokenScores


def test_sft_is_the_masked_negative_log_likelihood():
    lp = torch.log_softmax(torch.randn(2, 4, 7, dtype=torch.float64), -1)[..., 0]
    lp.requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    obj = build_objective("sft", {})
    out = obj(LossInputs(lp, torch.zeros_like(lp), mask, TokenScores(lp.detach())))
    out.loss_sum.backward()
    want = -sum(lp[b, t].item() for b in range(2) for t in range(4) if mask[b, t])
    assert abs(out.loss_sum.item() - want) < 1e-12
    assert torch.equal(lp.grad, -mask.double())
    assert out.n_tokens.item() == 5
    assert not any(obj.use_student_samples(step, 0) for step in range(1, 50))
