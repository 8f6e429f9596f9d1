"""reverse_kl's three estimators against brute-force references, values and gradients."""

import math

import pytest
import torch

from opd.objectives import LossInputs, build_objective
from opd.objectives.reverse_kl import discounted_returns
from opd.signals.at_ids import AtIdsScores
from opd.signals.full import FullScores
from opd.signals.sampled import TokenScores

B, T, V = 3, 5, 11


def _mask():
    m = torch.ones(B, T)
    m[0, 3:] = 0  # a short completion
    m[2, 0] = 0  # a position that does not count
    return m


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2


def test_sampled_matches_brute_force_value_and_grad():
    mask = _mask()
    old = torch.log_softmax(_logits(0), -1)[..., 0]
    teacher = torch.log_softmax(_logits(1), -1)[..., 0]
    lp = (old + 0.1 * torch.randn(B, T, dtype=torch.float64)).requires_grad_()
    c, gamma = 0.7, 0.5
    obj = build_objective("reverse_kl", {"estimator": "sampled", "coef": c, "gamma": gamma})
    out = obj(LossInputs(lp, old, mask, TokenScores(logprobs_BT=teacher)))
    out.loss_sum.backward()

    expected, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            adv = sum(
                gamma ** (u - t) * -c * (old[b, u] - teacher[b, u]).item()
                for u in range(t, T)
                if mask[b, u]
            )
            ratio = math.exp(lp[b, t].item() - old[b, t].item())
            expected += -ratio * adv
            grad[b, t] = -ratio * adv
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(lp.grad, grad, rtol=1e-9, atol=1e-12)
    assert out.n_tokens.item() == mask.sum().item()
    want_kl = ((old - teacher) * mask).sum().item()
    assert out.metrics["reverse_kl/sampled_kl"].item() == pytest.approx(want_kl)


def test_sampled_ratio_clip_matches_ppo_brute_force():
    mask = _mask()
    old = torch.log_softmax(_logits(6), -1)[..., 0]
    teacher = torch.log_softmax(_logits(7), -1)[..., 0]
    # stale samples: the current policy moved away from the one that sampled
    lp = (old + 0.5 * torch.randn(B, T, dtype=torch.float64)).requires_grad_()
    eps = 0.2
    obj = build_objective("reverse_kl", {"estimator": "sampled", "ratio_clip": eps})
    out = obj(LossInputs(lp, old, mask, TokenScores(logprobs_BT=teacher)))
    out.loss_sum.backward()

    expected, grad, clipped = 0.0, torch.zeros(B, T, dtype=torch.float64), 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            adv = -(old[b, t] - teacher[b, t]).item()
            ratio = math.exp(lp[b, t].item() - old[b, t].item())
            bounded = min(max(ratio, 1 - eps), 1 + eps)
            expected += -min(ratio * adv, bounded * adv)
            # the gradient flows only where the unclipped term is the smaller one
            grad[b, t] = -ratio * adv if ratio * adv <= bounded * adv else 0.0
            clipped += abs(ratio - 1) > eps
    assert 0 < clipped < mask.sum().item()  # both regimes are exercised
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(lp.grad, grad, rtol=1e-9, atol=1e-12)
    assert out.metrics["reverse_kl/clipped"].item() == clipped
    with pytest.raises(ValueError, match="ratio_clip"):
        build_objective("reverse_kl", {"ratio_clip": 1.5})


def test_discounted_returns_gamma_zero_is_identity_on_mask():
    v, m = torch.randn(B, T), _mask()
    assert torch.equal(discounted_returns(v, m, 0.0), v * m)


def _brute_full_kl(s_logits, t_lp):
    p = torch.softmax(s_logits, -1)
    return (p * (torch.log(p) - t_lp)).sum(-1)


def test_full_matches_brute_force_value_and_grad():
    mask = _mask()
    s_logits = _logits(2).requires_grad_()
    t_lp = torch.log_softmax(_logits(3), -1)
    ids = torch.zeros(B, T, dtype=torch.long)
    obj = build_objective("reverse_kl", {"estimator": "full", "full_chunk_tokens": 4})
    x = LossInputs(
        logprobs_BT=torch.log_softmax(s_logits, -1)[..., 0],
        old_logprobs_BT=torch.zeros(B, T, dtype=torch.float64),
        mask_BT=mask,
        teacher=FullScores(
            logprobs_BT=t_lp.gather(-1, ids[..., None])[..., 0],
            logits_BTV=t_lp + 7.0,  # unnormalized, as the teacher sends them
        ),
        student_logits_BTV=s_logits,
    )
    out = obj(x)
    (g,) = torch.autograd.grad(out.loss_sum, s_logits)

    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = (_brute_full_kl(ref_logits, t_lp) * mask).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_logits)
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(g, ref_g, atol=1e-10)

    # Health metrics, summed over counted tokens: each side's mass on its own 8 most likely
    # tokens and the fraction of those 8 ids the two sides share, from sorted python lists.
    k = 8
    s_mass = t_mass = overlap = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            p = torch.softmax(s_logits[b, t].detach(), -1).tolist()
            q = t_lp[b, t].exp().tolist()
            p_top = sorted(range(V), key=lambda i: -p[i])[:k]
            q_top = sorted(range(V), key=lambda i: -q[i])[:k]
            s_mass += sum(p[i] for i in p_top)
            t_mass += sum(q[i] for i in q_top)
            overlap += len(set(p_top) & set(q_top)) / k
    assert 0 < overlap < mask.sum().item()  # neither all nor none shared: a real check
    m = {key.removeprefix("reverse_kl/"): v.item() for key, v in out.metrics.items()}
    assert m["student_topk_mass"] == pytest.approx(s_mass, rel=1e-6)
    assert m["teacher_topk_mass"] == pytest.approx(t_mass, rel=1e-6)
    assert m["topk_overlap"] == pytest.approx(overlap, rel=1e-6)


def test_topk_with_whole_vocab_equals_full_and_tail_is_counted():
    mask = _mask()
    s_logits = _logits(4)
    t_lp = torch.log_softmax(_logits(5), -1)
    s_lp = torch.log_softmax(s_logits, -1)
    full = (_brute_full_kl(s_logits, t_lp) * mask).sum()

    def run(k):
        ids = s_lp.topk(k, -1).indices
        s_at = s_lp.gather(-1, ids).clone().requires_grad_()
        obj = build_objective("reverse_kl", {"estimator": "topk", "k": k})
        x = LossInputs(
            logprobs_BT=s_lp[..., 0],
            old_logprobs_BT=s_lp[..., 0],
            mask_BT=mask,
            teacher=AtIdsScores(
                logprobs_BT=t_lp[..., 0], ids_BTK=ids, logprobs_BTK=t_lp.gather(-1, ids)
            ),
            student_logprobs_BTK=s_at,
        )
        return obj(x), ids, s_at

    out_v, _, _ = run(V)
    assert out_v.loss_sum.item() == pytest.approx(full.item(), rel=1e-6)

    k = 3
    out, ids, s_at = run(k)
    out.loss_sum.backward()
    expected, s_mass, t_mass = 0.0, 0.0, 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            p = [s_lp[b, t, i].exp().item() for i in ids[b, t]]
            q = [t_lp[b, t, i].exp().item() for i in ids[b, t]]
            expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            pt, qt = 1 - sum(p), 1 - sum(q)
            expected += pt * math.log(pt / qt)
            s_mass, t_mass = s_mass + sum(p), t_mass + sum(q)
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-9)
    # health metrics: each side's mass on the student's top-k, summed over counted tokens
    assert out.metrics["reverse_kl/student_topk_mass"].item() == pytest.approx(s_mass, rel=1e-9)
    got = out.metrics["reverse_kl/teacher_mass_on_student_topk"].item()
    assert got == pytest.approx(t_mass, rel=1e-9)
    # d/d log p_i of [p_i log(p_i/q_i) + tail(p)] = p_i (log(p_i/q_i) + 1) - p_i (log(pt/qt) + 1)
    p_at = s_at.detach().exp()
    q_at = t_lp.gather(-1, ids).exp()
    pt = 1 - p_at.sum(-1, keepdim=True)
    qt = 1 - q_at.sum(-1, keepdim=True)
    want = p_at * (torch.log(p_at / q_at) - torch.log(pt / qt)) * mask[..., None]
    assert torch.allclose(s_at.grad, want, atol=1e-10)


def test_unknown_estimator_and_param_names_fail_with_the_key():
    with pytest.raises(ValueError, match="estimator"):
        build_objective("reverse_kl", {"estimator": "exact"})
    with pytest.raises(ValueError, match="gama"):
        build_objective("reverse_kl", {"gama": 0.1})
    with pytest.raises(ValueError, match="valid: reverse_kl"):
        build_objective("forward_kl", {})
