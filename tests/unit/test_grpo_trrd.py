"""grpo, trrd and reward-mixed reverse_kl against per-token brute force, values and gradients."""

import math
from pathlib import Path

import pytest
import torch

from opd.config import load_config
from opd.objectives import REGISTRY, LossInputs, build_objective
from opd.signals.sampled import TokenScores

B, T = 4, 6
TINY = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"


def _mask():
    m = torch.ones(B, T, dtype=torch.float64)
    m[0, 4:] = 0  # a short completion
    m[2, 1] = 0  # a position that does not count
    return m


def _inputs(seed, spread=0.4, teacher_spread=1.5):
    """Old, current (a leaf) and teacher log-probs; the current policy moved by `spread`."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = old + teacher_spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    return lp, old, teacher


ADV = torch.tensor([1.3, -0.7, 0.0, -1.9], dtype=torch.float64)  # +, -, an all-equal group, -


def _x(lp, old, teacher, mask, adv=ADV):
    return LossInputs(lp, old, mask, TokenScores(logprobs_BT=teacher), advantages_B=adv)


def _ppo_token(log_r, a, eps_lo, eps_hi):
    """-min(r A, clip(r) A) case by case: A > 0 caps r at 1 + eps_hi, A < 0 floors it at
    1 - eps_lo; a capped or floored ratio is a constant (A = 0: nothing to clip)."""
    r = torch.exp(log_r)
    if a > 0 and r.item() > 1 + eps_hi:
        return log_r * 0 - (1 + eps_hi) * a, "high"
    if a < 0 and r.item() < 1 - eps_lo:
        return log_r * 0 - (1 - eps_lo) * a, "low"
    return -r * a, None


def _brute(lp, old, teacher, mask, adv, *, eps_lo, eps_hi, kl_coef=0.0, alpha=1.0):
    """Loss sum, gradient and regime counts, one scalar leaf per token."""
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    seen = {"high": 0, "low": 0, "clamp": 0, "kl": 0.0}
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            leaf = torch.tensor(lp[b, t].item(), dtype=torch.float64, requires_grad=True)
            teacher_term = leaf - teacher[b, t].item()
            if abs(teacher_term.item()) > 1:  # clamped: a constant
                teacher_term = leaf * 0 + math.copysign(1.0, teacher_term.item())
                seen["clamp"] += 1
            log_r = alpha * (leaf - old[b, t].item()) + (1 - alpha) * teacher_term
            value, side = _ppo_token(log_r, adv[b].item(), eps_lo, eps_hi)
            if side:
                seen[side] += 1
            if kl_coef:
                d = teacher[b, t].item() - leaf
                kl = torch.exp(d) - d - 1
                seen["kl"] += kl.item()
                value = value + kl_coef * kl
            value.backward()
            loss += value.item()
            grad[b, t] = leaf.grad
    return loss, grad, seen


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_grpo_matches_brute_force_value_and_grad(kl_coef):
    mask = _mask()
    lp, old, teacher = _inputs(0, spread=0.4)
    obj = build_objective("grpo", {"kl_coef": kl_coef})
    out = obj(_x(lp, old, teacher, mask))
    out.loss_sum.backward()
    want, grad, seen = _brute(lp, old, teacher, mask, ADV, eps_lo=0.2, eps_hi=0.28, kl_coef=kl_coef)
    assert seen["high"] > 0 and seen["low"] > 0  # both clip sides are exercised
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(lp.grad, grad, rtol=1e-12, atol=1e-14)
    assert out.n_tokens.item() == mask.sum().item()
    m = out.metrics
    assert m["grpo/clip_high_frac"].item() == seen["high"]
    assert m["grpo/clip_low_frac"].item() == seen["low"]
    assert m["grpo/clip_frac"].item() == seen["high"] + seen["low"]
    ratio = ((lp.detach() - old).exp() * mask).sum().item()
    assert m["grpo/ratio"].item() == pytest.approx(ratio, rel=1e-12)
    tokens = mask.sum(1)
    assert m["grpo/advantage"].item() == pytest.approx((ADV * tokens).sum().item())
    assert m["grpo/abs_advantage"].item() == pytest.approx((ADV.abs() * tokens).sum().item())
    if kl_coef:
        assert m["grpo/kl"].item() == pytest.approx(seen["kl"], rel=1e-12)
    else:
        assert "grpo/kl" not in m


def test_grpo_on_policy_is_the_reward_weighted_policy_gradient():
    """r = 1: the loss is -sum A, its gradient -A on every counted token."""
    mask = _mask()
    _, old, teacher = _inputs(1)
    lp = old.clone().requires_grad_()
    out = build_objective("grpo", {})(_x(lp, old, teacher, mask))
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(-(ADV[:, None] * mask).sum().item())
    assert torch.equal(lp.grad, -ADV[:, None] * mask)
    assert out.metrics["grpo/clip_frac"].item() == 0


@pytest.mark.parametrize("alpha,kl_coef", [(0.5, 0.0), (0.3, 0.1), (0.0, 0.0)])
def test_trrd_matches_brute_force_value_and_grad(alpha, kl_coef):
    mask = _mask()
    lp, old, teacher = _inputs(2, spread=0.5, teacher_spread=1.5)
    params = {"alpha": alpha, "kl_coef": kl_coef, "eps_lo": 0.15, "eps_hi": 0.25}
    obj = build_objective("trrd", params)
    out = obj(_x(lp, old, teacher, mask))
    out.loss_sum.backward()
    want, grad, seen = _brute(
        lp, old, teacher, mask, ADV, eps_lo=0.15, eps_hi=0.25, kl_coef=kl_coef, alpha=alpha
    )
    counted = int(mask.sum().item())
    assert 0 < seen["clamp"] < counted  # the teacher clamp is hit, and not everywhere
    assert seen["high"] > 0 and seen["low"] > 0
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(lp.grad, grad, rtol=1e-12, atol=1e-14)
    m = out.metrics
    assert m["trrd/teacher_clamped_frac"].item() == seen["clamp"]
    assert m["trrd/clip_frac"].item() == seen["high"] + seen["low"]
    term = ((lp.detach() - teacher) * mask).sum().item()
    assert m["trrd/teacher_log_ratio"].item() == pytest.approx(term, rel=1e-12)


def test_trrd_alpha_one_is_grpo_exactly():
    mask = _mask()
    lp, old, teacher = _inputs(3, spread=0.5)
    lp2 = lp.detach().clone().requires_grad_()
    params = {"eps_lo": 0.2, "eps_hi": 0.28, "kl_coef": 0.02}
    grpo = build_objective("grpo", params)(_x(lp, old, teacher, mask))
    trrd = build_objective("trrd", {**params, "alpha": 1.0})(_x(lp2, old, teacher, mask))
    grpo.loss_sum.backward()
    trrd.loss_sum.backward()
    assert torch.equal(grpo.loss_sum, trrd.loss_sum)
    assert torch.equal(lp.grad, lp2.grad)
    for key, value in grpo.metrics.items():
        assert torch.equal(value, trrd.metrics[key.replace("grpo/", "trrd/")])


def test_trrd_teacher_term_gradient_stops_outside_the_clamp():
    """alpha = 0, one token: the gradient is the teacher term's, zero once it is clamped."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    teacher = torch.tensor([[-0.5, -2.0, 1.5]], dtype=torch.float64)  # lp - T: 0.5, 2, -1.5
    lp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    obj = build_objective("trrd", {"alpha": 0.0, "eps_lo": 0.9, "eps_hi": 9.0})
    adv = torch.tensor([1.0], dtype=torch.float64)
    out = obj(_x(lp, old, teacher, torch.ones(1, 3, dtype=torch.float64), adv))
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(-(math.exp(0.5) + math.exp(1) + math.exp(-1)))
    assert lp.grad[0].tolist() == pytest.approx([-math.exp(0.5), 0.0, 0.0])


def test_padding_never_leaks_a_nan():
    mask = _mask()
    lp, old, teacher = _inputs(4)
    lp = lp.detach().masked_fill(mask == 0, 800.0).requires_grad_()  # exp() would overflow
    teacher = teacher.masked_fill(mask == 0, -math.inf)
    for name, params in [("grpo", {"kl_coef": 0.1}), ("trrd", {"kl_coef": 0.1})]:
        out = build_objective(name, params)(_x(lp, old, teacher, mask))
        (g,) = torch.autograd.grad(out.loss_sum, lp)
        assert torch.isfinite(out.loss_sum) and torch.isfinite(g).all()
        assert (g[mask == 0] == 0).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())


def test_reward_mixed_reverse_kl_matches_hand_computation():
    mask = _mask()
    lp, old, teacher = _inputs(5, spread=0.2)
    c, gamma, w = 0.7, 0.5, 0.3
    params = {"coef": c, "gamma": gamma, "reward_coef": w}
    obj = build_objective("reverse_kl", params)
    out = obj(_x(lp, old, teacher, mask))
    out.loss_sum.backward()

    want, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            kl_part = sum(
                gamma ** (u - t) * -c * (old[b, u] - teacher[b, u]).item()
                for u in range(t, T)
                if mask[b, u]
            )
            adv = kl_part + w * ADV[b].item()  # the reward term is not discounted
            ratio = math.exp(lp[b, t].item() - old[b, t].item())
            want += -ratio * adv
            grad[b, t] = -ratio * adv
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(lp.grad, grad, rtol=1e-12, atol=1e-14)
    mixed = (w * ADV[:, None] * mask).sum().item()
    assert out.metrics["reverse_kl/reward_advantage"].item() == pytest.approx(mixed)


@pytest.mark.parametrize("params", [{}, {"gamma": 0.5, "ratio_clip": 0.2}])
def test_reward_coef_zero_is_the_unmixed_objective_bit_for_bit(params):
    mask = _mask()
    lp, old, teacher = _inputs(6, spread=0.4)
    lp2 = lp.detach().clone().requires_grad_()
    plain = build_objective("reverse_kl", params)
    zero = build_objective("reverse_kl", {**params, "reward_coef": 0.0})
    a = plain(LossInputs(lp, old, mask, TokenScores(logprobs_BT=teacher)))
    b = zero(_x(lp2, old, teacher, mask))  # advantages present and ignored
    a.loss_sum.backward()
    b.loss_sum.backward()
    assert torch.equal(a.loss_sum, b.loss_sum) and torch.equal(lp.grad, lp2.grad)
    assert a.metrics.keys() == b.metrics.keys()
    assert all(torch.equal(a.metrics[k], b.metrics[k]) for k in a.metrics)
    assert not plain.uses_rewards() and not zero.uses_rewards()


def test_missing_rewards_and_bad_params_are_named():
    mask = _mask()
    lp, old, teacher = _inputs(7)
    no_adv = LossInputs(lp, old, mask, TokenScores(logprobs_BT=teacher))
    for name, params in [("grpo", {}), ("trrd", {}), ("reverse_kl", {"reward_coef": 1.0})]:
        with pytest.raises(ValueError, match=f"objective {name} needs rewards: set rewards.name"):
            build_objective(name, params)(no_adv)
    with pytest.raises(ValueError, match="reward_coef=0.5 .*estimator='topk'"):
        build_objective("reverse_kl", {"estimator": "topk", "reward_coef": 0.5})
    with pytest.raises(ValueError, match="objective.params.alpha"):
        build_objective("trrd", {"alpha": 1.5})
    with pytest.raises(ValueError, match="objective.params.eps_lo"):
        build_objective("grpo", {"eps_lo": 1.0})
    with pytest.raises(ValueError, match="objective.params.kl_coef"):
        build_objective("grpo", {"kl_coef": -0.1})
    with pytest.raises(ValueError, match="objective.params"):
        build_objective("grpo", {"alpha": 0.5})  # a trrd param


def test_declared_needs_and_group_check():
    assert {"grpo", "trrd"} <= set(REGISTRY)
    grpo, trrd = build_objective("grpo", {}), build_objective("trrd", {})
    mixed = build_objective("reverse_kl", {"reward_coef": 0.5})
    for obj in (grpo, trrd, mixed):
        assert obj.uses_rewards() and obj.uses_sampler_logprobs()
        assert obj.teacher_request().signal == "sampled"
        assert obj.normalize_by == "tokens"
    assert not any(build_objective(n, {}).uses_rewards() for n in ("reverse_kl", "gkd", "sft"))
    single = load_config(TINY, ["rollout.samples_per_prompt=1"])
    for obj in (grpo, trrd, mixed):
        with pytest.raises(ValueError, match="rollout.samples_per_prompt=1 must be >= 2"):
            obj.check(single)
        obj.check(load_config(TINY))  # the tiny recipe samples 2 per prompt
    build_objective("reverse_kl", {}).check(single)  # no rewards, no groups needed
