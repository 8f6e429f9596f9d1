"""sod against a brute force over crafted multi-turn trajectories: the tool tokens out of the
mask, the step boundaries, the step divergences and weights (d_1 = 0, one-step
trajectories, the delta cap), the advantage, and the clipped loss's value and gradient."""

import math

import pytest
import torch

from opd.objectives import build_objective
from opd.objectives.base import LossInputs
from opd.objectives.sod import step_weights
from opd.signals.sampled import TokenScores

# Three trajectories of 9 completion tokens: the model writes a step, a tool answers (mask 0),
# the model writes the next step; the last is a one-step trajectory cut short (padding).
STEPS = [
    [0, 0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 2, 2, 2],
    [0, 0, 0, 0, 0, 0, 0, 0, 0],
]
MASK = [
    [1, 1, 1, 0, 0, 1, 1, 1, 1],  # two tool-output tokens between step 0 and step 1
    [1, 1, 0, 0, 1, 0, 1, 1, 1],  # tool tokens after step 0 and after step 1
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # padding after 5 tokens
]
ADV = [0.8, -1.1, 0.0]


def _tensors(seed, first_gap=None):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 9, generator=g, dtype=torch.float64) * 3
    teacher = old + 1.2 * torch.randn(3, 9, generator=g, dtype=torch.float64)
    if first_gap is not None:  # set every step-0 token's |old - teacher| of sequence 0
        teacher[0, :5] = old[0, :5] + first_gap
    lp = (old + 0.3 * torch.randn(3, 9, generator=g, dtype=torch.float64)).requires_grad_()
    return lp, old, teacher


def _brute(lp, old, teacher, *, coef, delta, eps, eps_lo=0.2, eps_hi=0.28):
    """Loss sum, gradient, and each sequence's step weights, one token at a time."""
    loss, grad, weights = 0.0, torch.zeros(3, 9, dtype=torch.float64), []
    for b in range(3):
        steps = sorted({STEPS[b][t] for t in range(9) if MASK[b][t]})
        d = {}
        for k in steps:
            gaps = [
                abs(old[b, t].item() - teacher[b, t].item())
                for t in range(9)
                if MASK[b][t] and STEPS[b][t] == k
            ]
            d[k] = sum(gaps) / len(gaps)
        w = {k: 1.0 if k == 0 else min((d[0] + eps) / (d[k] + eps), 1 + delta) for k in steps}
        weights.append(w)
        for t in range(9):
            if not MASK[b][t]:
                continue
            k = STEPS[b][t]
            a = ADV[b] + coef * w[k] * (teacher[b, t].item() - old[b, t].item())
            leaf = torch.tensor(lp[b, t].item(), dtype=torch.float64, requires_grad=True)
            r = torch.exp(leaf - old[b, t].item())
            clipped = r.clamp(1 - eps_lo, 1 + eps_hi)
            value = -torch.minimum(r * a, clipped * a)
            value.backward()
            loss += value.item()
            grad[b, t] = leaf.grad
    return loss, grad, weights


def _x(lp, old, teacher):
    mask = torch.tensor(MASK, dtype=torch.float64)
    return LossInputs(
        lp,
        old,
        mask,
        TokenScores(logprobs_BT=teacher),
        advantages_B=torch.tensor(ADV, dtype=torch.float64),
        steps_BT=torch.tensor(STEPS),
    )


@pytest.mark.parametrize(
    "params", [{}, {"coef": 0.5, "delta": 0.0}, {"coef": 2.0, "delta": 1.5, "weight_eps": 0.1}]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_sod_matches_brute_force_value_grad_and_weights(params, seed):
    sod = build_objective("sod", params)
    p = sod.params
    lp, old, teacher = _tensors(seed)
    out = sod(_x(lp, old, teacher))
    out.loss_sum.backward()
    loss, grad, weights = _brute(lp, old, teacher, coef=p.coef, delta=p.delta, eps=p.weight_eps)
    assert math.isclose(out.loss_sum.item(), loss, rel_tol=1e-10, abs_tol=1e-12)
    torch.testing.assert_close(lp.grad, grad, rtol=1e-10, atol=1e-12)
    assert out.n_tokens.item() == sum(map(sum, MASK))
    mask = torch.tensor(MASK, dtype=torch.float64)
    w, _ = step_weights((old - teacher).abs(), mask, torch.tensor(STEPS), p.weight_eps, p.delta)
    for b in range(3):
        for t in range(9):
            if MASK[b][t]:
                assert math.isclose(w[b, t].item(), weights[b][STEPS[b][t]], rel_tol=1e-12)
    expected = sum(weights[b][STEPS[b][t]] for b in range(3) for t in range(9) if MASK[b][t])
    assert math.isclose(out.metrics["sod/step_weight"].item(), expected, rel_tol=1e-12)


def test_tool_tokens_change_nothing():
    """Whatever sits at a masked (tool) position, the loss and gradient are the same."""
    sod = build_objective("sod", {})
    lp, old, teacher = _tensors(3)
    out = sod(_x(lp, old, teacher))
    (g1,) = torch.autograd.grad(out.loss_sum, lp)
    tool = torch.tensor(MASK) == 0
    old2 = torch.where(tool, old - 7.0, old)
    teacher2 = torch.where(tool, teacher + 9.0, teacher)
    out2 = sod(_x(lp, old2, teacher2))
    (g2,) = torch.autograd.grad(out2.loss_sum, lp)
    assert out2.loss_sum.item() == out.loss_sum.item()
    assert torch.equal(g1, g2) and not g1[tool].any()


def test_first_step_without_drift_silences_later_teacher_terms_and_the_cap_holds():
    mask = torch.tensor(MASK, dtype=torch.float64)
    steps = torch.tensor(STEPS)
    _, old, teacher = _tensors(0, first_gap=0.0)  # d_1 = 0 for sequence 0
    w, d = step_weights((old - teacher).abs(), mask, steps, 1e-6, 0.2)
    assert d[0, 0].item() == 0.0 and w[0, 0].item() == 1.0
    later = (steps[0] == 1) & (mask[0] > 0)
    assert (w[0][later] < 1e-5).all()  # eps / (d_k + eps): next to nothing
    # a first step that drifted far more than the later ones: the weight stops at 1 + delta
    _, old, teacher = _tensors(0, first_gap=50.0)
    w, _ = step_weights((old - teacher).abs(), mask, steps, 1e-6, 0.2)
    assert torch.allclose(w[0][later], torch.full_like(w[0][later], 1.2))


def test_one_step_trajectories_weigh_one_and_no_steps_means_one_step():
    sod = build_objective("sod", {})
    lp, old, teacher = _tensors(5)
    mask = torch.tensor(MASK, dtype=torch.float64)
    w, _ = step_weights((old - teacher).abs(), mask, None, 1e-6, 0.2)
    assert torch.equal(w, torch.ones_like(w))
    x = _x(lp, old, teacher)
    x.steps_BT = torch.zeros_like(x.steps_BT)
    with_zeros = sod(x).loss_sum.item()
    x.steps_BT = None
    assert sod(x).loss_sum.item() == with_zeros


def test_coef_zero_is_grpo_exactly():
    lp, old, teacher = _tensors(7)
    a = build_objective("sod", {"coef": 0.0})(_x(lp, old, teacher))
    b = build_objective("grpo", {})(_x(lp, old, teacher))
    assert a.loss_sum.item() == b.loss_sum.item()
    (ga,) = torch.autograd.grad(a.loss_sum, lp)
    (gb,) = torch.autograd.grad(b.loss_sum, lp)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize(
    "params, key", [({"delta": -0.1}, "delta"), ({"weight_eps": 0.0}, "weight_eps")]
)
def test_bad_params_are_named(params, key):
    with pytest.raises(ValueError, match=key):
        build_objective("sod", params)


def test_a_trajectory_reaches_the_loss_as_mask_and_steps():
    """collate carries a trajectory's loss mask and step ids; the step's token count (the
    learner's normalizer) counts the model-written tokens only."""
    from opd.learner.microbatch import collate
    from opd.objectives.base import step_normalizer
    from opd.samples import Sample

    def sample(i, n, loss_mask=None, step_ids=None):
        s = Sample(i, 0, str(i), [], [1, 2], list(range(3, 3 + n)), [-0.5] * n)
        s.loss_mask, s.step_ids = loss_mask, step_ids
        s.teacher = TokenScores(logprobs_BT=torch.full((1, n), -1.0))
        return s

    agent = sample(0, 5, [1, 1, 0, 0, 1], [0, 0, 0, 0, 1])
    plain = sample(1, 3)
    mb = collate([agent, plain])
    assert mb.mask_BT.tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 0, 0]]
    assert mb.steps_BT.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert collate([plain]).steps_BT is None
    metas = [agent.meta(), plain.meta()]
    assert [m.loss_tokens for m in metas] == [3, 3]
    assert step_normalizer(build_objective("sod", {}), [m.loss_tokens for m in metas]) == 6
