"""gkd and sdft, and the divergences they share, against brute-force float64 references.

Values come from explicit python loops over probabilities; gradients w.r.t. the student's
logits from a torch reference written in probability space (no log-space tricks), which the
implementation (log space, logaddexp, chunks, checkpointing, tail buckets) must match.
"""

import math

import pytest
import torch

from opd.objectives import REGISTRY, LossInputs, Objective, build_objective
from opd.objectives.base import step_normalizer
from opd.objectives.divergences import (
    divergence,
    forward_kl,
    full_divergence,
    generalized_jsd,
    reverse_kl,
    topk_divergence,
)
from opd.objectives.reverse_kl import topk_reverse_kl
from opd.objectives.sdft import teacher_prompt
from opd.samples import Sample
from opd.signals.at_ids import AtIdsScores
from opd.signals.full import FullScores

B, T, V = 3, 5, 11
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9)]


def _mask():
    m = torch.ones(B, T, dtype=torch.float64)
    m[0, 3:] = 0  # a short completion
    m[2, 0] = 0  # a position that does not count
    return m


def _logits(seed, shape=(B, T, V)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


# ---- brute-force references ------------------------------------------------------------


def _tempered(logps, tau):
    """Explicit probabilities proportional to exp(l / tau) for a list of log-weights."""
    e = [math.exp(x / tau) for x in logps]
    s = sum(e)
    return [x / s for x in e]


def _brute(kind, ps, pt, beta=0.5):
    """One token's divergence from explicit probability lists, with 0 log 0 = 0."""

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(pt, ps)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(ps, pt)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def _brute_full_sum(kind, s_logits, t_lp, mask, beta=0.5, tau=1.0):
    total = 0.0
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1]):
            if mask[b, t]:
                ps = _tempered(s_logits[b, t].tolist(), tau)
                pt = _tempered(t_lp[b, t].tolist(), tau)
                total += _brute(kind, ps, pt, beta)
    return total


def _buckets(lp_at_ids, tau):
    """The k support probabilities plus the tail (floored like the code), tempered."""
    p = [math.exp(x) for x in lp_at_ids]
    p.append(max(1.0 - sum(p), 1e-6))
    return _tempered([math.log(x) for x in p], tau)


def _ref_probs_div(kind, ps, pt, beta):
    """Torch reference in probability space (for gradients)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return (pt * torch.log(pt / ps)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return (ps * torch.log(ps / pt)).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * torch.log(pt / m)).sum(-1) + (1 - beta) * (ps * torch.log(ps / m)).sum(-1)


def _ref_full(kind, s_logits, t_lp, beta, tau):
    ps = torch.softmax(s_logits / tau, -1)
    pt = torch.exp(t_lp / tau)
    pt = pt / pt.sum(-1, keepdim=True)
    return _ref_probs_div(kind, ps, pt, beta)


def _ref_topk(kind, s_logits, t_lp, ids, beta, tau):
    def buckets(p_full):
        p = p_full.gather(-1, ids)
        tail = (1 - p.sum(-1, keepdim=True)).clamp_min(1e-6)
        w = torch.cat([p, tail], -1) ** (1 / tau)
        return w / w.sum(-1, keepdim=True)

    return _ref_probs_div(kind, buckets(torch.softmax(s_logits, -1)), buckets(t_lp.exp()), beta)


def _inputs(s_logits, t_lp, mask, k=None):
    """LossInputs as the learner builds them: full logits, or log-probs at the student top-k."""
    s_lp = torch.log_softmax(s_logits, -1)
    sampled = torch.zeros(s_logits.shape[:2], dtype=torch.long)
    t_sampled = t_lp.gather(-1, sampled[..., None])[..., 0]
    x = LossInputs(
        logprobs_BT=s_lp.gather(-1, sampled[..., None])[..., 0],
        old_logprobs_BT=s_lp.detach().gather(-1, sampled[..., None])[..., 0],
        mask_BT=mask,
        teacher=None,
    )
    if k is None:  # unnormalized logits, as the teacher sends them
        x.teacher = FullScores(logprobs_BT=t_sampled, logits_BTV=t_lp - 3.0)
        x.student_logits_BTV = s_logits
    else:
        ids = s_lp.detach().topk(k, -1).indices
        x.teacher = AtIdsScores(t_sampled, ids, t_lp.gather(-1, ids))
        x.student_logprobs_BTK = s_lp.gather(-1, ids)
    return x


# ---- the divergences -------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergence_on_log_probs_matches_python_loops(kind, beta):
    s_lp = torch.log_softmax(_logits(0, (4, V)), -1)
    t_lp = torch.log_softmax(_logits(1, (4, V)), -1)
    got = divergence(kind, s_lp, t_lp, beta)
    for i in range(4):
        want = _brute(kind, s_lp[i].exp().tolist(), t_lp[i].exp().tolist(), beta)
        assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_zero_teacher_probabilities_count_as_zero_log_zero():
    s_lp = torch.log_softmax(_logits(0, (2, V)), -1)
    t_logits = _logits(1, (2, V))
    t_logits[:, :3] = -math.inf
    t_lp = torch.log_softmax(t_logits, -1)
    fwd = forward_kl(s_lp, t_lp)
    jsd = generalized_jsd(s_lp, t_lp, 0.5)
    for i in range(2):
        ps, pt = s_lp[i].exp().tolist(), t_lp[i].exp().tolist()
        assert fwd[i].item() == pytest.approx(_brute("forward_kl", ps, pt), rel=1e-12)
        assert jsd[i].item() == pytest.approx(_brute("jsd", ps, pt, 0.5), rel=1e-12)
    # The student has mass where P_T = 0: unbounded, clamped to a huge finite value, not NaN.
    assert (reverse_kl(s_lp, t_lp) > 1e30).all()


@pytest.mark.parametrize("tau", [1.0, 0.9])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_full_divergence_value_and_grad(kind, beta, tau):
    mask = _mask()
    s_logits = _logits(2).requires_grad_()
    t_lp = torch.log_softmax(_logits(3), -1)
    d = full_divergence(s_logits, t_lp, kind, beta, tau, chunk=4)  # 15 tokens: ragged chunks
    loss = (d * mask).sum()
    (g,) = torch.autograd.grad(loss, s_logits)

    want = _brute_full_sum(kind, s_logits.detach(), t_lp, mask, beta, tau)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = (_ref_full(kind, ref_logits, t_lp, beta, tau) * mask).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(g, ref_g, atol=1e-10)
    if kind == "forward_kl":  # d KL(T||S) / d z = (p_S - p_T) / tau at temperature tau
        ps = torch.softmax(s_logits.detach() / tau, -1)
        pt = torch.softmax(t_lp / tau, -1)
        assert torch.allclose(g, (ps - pt) / tau * mask[..., None], atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.9])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_topk_divergence_with_tail_value_and_grad(kind, beta, tau):
    mask, k = _mask(), 3
    s_logits = _logits(4).requires_grad_()
    t_lp = torch.log_softmax(_logits(5), -1)
    s_lp = torch.log_softmax(s_logits, -1)
    ids = s_lp.detach().topk(k, -1).indices
    d = topk_divergence(s_lp.gather(-1, ids), t_lp.gather(-1, ids), kind, beta, tau)
    loss = (d * mask).sum()
    (g,) = torch.autograd.grad(loss, s_logits)

    want = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                ps = _buckets([s_lp[b, t, i].item() for i in ids[b, t]], tau)
                pt = _buckets([t_lp[b, t, i].item() for i in ids[b, t]], tau)
                want += _brute(kind, ps, pt, beta)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = (_ref_topk(kind, ref_logits, t_lp, ids, beta, tau) * mask).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(g, ref_g, atol=1e-10)


def test_topk_reverse_kl_agrees_with_reverse_kl_objective():
    s_lp = torch.log_softmax(_logits(6), -1)
    t_lp = torch.log_softmax(_logits(7), -1)
    ids = s_lp.topk(4, -1).indices
    s_at, t_at = s_lp.gather(-1, ids), t_lp.gather(-1, ids)
    assert torch.allclose(
        topk_divergence(s_at, t_at, "reverse_kl"), topk_reverse_kl(s_at, t_at), atol=1e-14
    )


def test_jsd_ends_are_exactly_the_kls_and_small_beta_scales_to_forward_kl():
    s_lp = torch.log_softmax(_logits(8), -1)
    t_lp = torch.log_softmax(_logits(9), -1)
    assert torch.equal(generalized_jsd(s_lp, t_lp, 0.0), forward_kl(s_lp, t_lp))
    assert torch.equal(generalized_jsd(s_lp, t_lp, 1.0), reverse_kl(s_lp, t_lp))
    # The unscaled JSD_beta vanishes at the ends; JSD_beta / beta -> KL(T||S) as beta -> 0.
    eps = 1e-9  # the gap closes linearly in beta
    assert torch.allclose(generalized_jsd(s_lp, t_lp, eps) / eps, forward_kl(s_lp, t_lp), rtol=1e-5)


# ---- gkd -------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["full", "topk"])
def test_gkd_beta_ends_equal_forward_and_reverse_kl_exactly(estimator):
    mask = _mask()
    s_logits = _logits(10)
    t_lp = torch.log_softmax(_logits(11), -1)
    k = None if estimator == "full" else 4
    for beta, kind in [(0.0, "forward_kl"), (1.0, "reverse_kl")]:
        obj = build_objective(
            "gkd", {"beta": beta, "estimator": estimator, "k": k or 64, "loss_temperature": 0.9}
        )
        out = obj(_inputs(s_logits, t_lp, mask, k))
        x = _inputs(s_logits, t_lp, mask, k)
        if estimator == "full":
            d = full_divergence(x.student_logits_BTV, x.teacher.logits_BTV, kind, 0.5, 0.9)
            want = _brute_full_sum(kind, s_logits, t_lp, mask, tau=0.9)
            assert out.loss_sum.item() == pytest.approx(want, rel=1e-11, abs=1e-12)
        else:
            d = topk_divergence(x.student_logprobs_BTK, x.teacher.logprobs_BTK, kind, 0.5, 0.9)
            ids = x.teacher.ids_BTK
            want = sum(
                _brute(
                    kind,
                    _buckets([s_logits[b, t].log_softmax(-1)[i].item() for i in ids[b, t]], 0.9),
                    _buckets([t_lp[b, t, i].item() for i in ids[b, t]], 0.9),
                )
                for b in range(B)
                for t in range(T)
                if mask[b, t]
            )
            assert out.loss_sum.item() == pytest.approx(want, rel=1e-10)
        assert torch.equal(out.loss_sum, (d * mask).sum())  # the ends are the KLs, exactly


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_full_is_a_token_sum_matching_brute_force_value_and_grad(beta):
    mask = _mask()
    s_logits = _logits(12).requires_grad_()
    t_lp = torch.log_softmax(_logits(13), -1)
    obj = build_objective("gkd", {"beta": beta, "full_chunk_tokens": 2})
    assert obj.normalize_by == "tokens"
    out = obj(_inputs(s_logits, t_lp, mask))
    (g,) = torch.autograd.grad(out.loss_sum, s_logits)

    # the default loss temperature is 1, as in TRL's GKDTrainer (its 0.9 is for sampling)
    want = _brute_full_sum("jsd", s_logits.detach(), t_lp, mask, beta, tau=1.0)
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-10)
    assert out.n_tokens.item() == mask.sum().item()
    assert out.metrics["gkd/jsd"].item() == pytest.approx(want, rel=1e-10)
    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = (_ref_full("jsd", ref_logits, t_lp, beta, 1.0) * mask).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(g, ref_g, atol=1e-10)


@pytest.mark.parametrize("tau", [1.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_topk_with_whole_vocab_equals_full(beta, tau):
    mask = _mask()
    s_logits = _logits(14)
    t_lp = torch.log_softmax(_logits(15), -1)
    full = build_objective("gkd", {"beta": beta, "loss_temperature": tau})
    topk = build_objective(
        "gkd", {"beta": beta, "loss_temperature": tau, "estimator": "topk", "k": V}
    )
    a = full(_inputs(s_logits, t_lp, mask)).loss_sum
    b = topk(_inputs(s_logits, t_lp, mask, k=V)).loss_sum
    # The floored tail bucket (1e-6 on both sides) is the only difference.
    assert b.item() == pytest.approx(a.item(), rel=1e-10 if tau == 1.0 else 1e-5)


def test_gkd_masked_positions_never_leak_nan():
    mask = _mask()
    s_logits = _logits(16).requires_grad_()
    t_lp = torch.log_softmax(_logits(17), -1)
    garbage = t_lp.clone()
    garbage[mask == 0] = math.nan
    obj = build_objective("gkd", {})
    out = obj(_inputs(s_logits, garbage, mask))
    want = obj(_inputs(s_logits, t_lp, mask)).loss_sum
    assert out.loss_sum.item() == pytest.approx(want.item(), rel=1e-12)


def test_gkd_teacher_request_follows_the_estimator():
    assert build_objective("gkd", {}).teacher_request().signal == "full"
    req = build_objective("gkd", {"estimator": "topk"}).teacher_request()
    assert (req.signal, req.k) == ("at_ids", 64)


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 0.5, 1.0])
def test_use_student_samples_is_deterministic_with_fraction_lmbda(lmbda):
    obj = build_objective("gkd", {"lmbda": lmbda})
    n = 20000
    draws = [obj.use_student_samples(step, seed=7) for step in range(n)]
    assert sum(draws) / n == pytest.approx(lmbda, abs=0.015)
    again = build_objective("gkd", {"lmbda": lmbda})
    assert draws == [again.use_student_samples(step, seed=7) for step in range(n)]
    if 0 < lmbda < 1:
        other = [obj.use_student_samples(step, seed=8) for step in range(n)]
        assert other != draws
        # Independent draws, not a pattern: both kinds follow each kind.
        pairs = set(zip(draws, draws[1:]))
        assert pairs == {(True, True), (True, False), (False, True), (False, False)}


# ---- sdft ------------------------------------------------------------------------------

LENGTHS = [6, 3, 2, 5]  # sequences of <= 3 tokens contribute nothing


def _sdft_batch(seed, V_=V):
    Bs, Ts = len(LENGTHS), max(LENGTHS)
    mask = torch.zeros(Bs, Ts, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    s_logits = _logits(seed, (Bs, Ts, V_))
    t_lp = torch.log_softmax(_logits(seed + 1, (Bs, Ts, V_)), -1)
    g = torch.Generator().manual_seed(seed + 2)
    log_ratio = torch.randn(Bs, Ts, generator=g, dtype=torch.float64)  # some ratios exceed 2
    return mask, s_logits, t_lp, log_ratio


def _sdft_inputs(s_logits, t_lp, mask, log_ratio, k=None):
    x = _inputs(s_logits, t_lp, mask, k)
    x.logprobs_BT = x.old_logprobs_BT + log_ratio
    return x


def _brute_sdft(kind, s_logits, t_lp, mask, log_ratio, alpha=0.5, clip=2.0, skip=3):
    """sum_i w_i * mean_t D_it over t >= skip; w_i = mean_t min(ratio_it, clip)."""
    total, weights, means = 0.0, [], []
    for i in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[i, t] and t >= skip]
        if not ts:
            weights.append(1.0)
            means.append(0.0)
            continue
        d = [
            _brute(kind, _tempered(s_logits[i, t].tolist(), 1), t_lp[i, t].exp().tolist(), alpha)
            for t in ts
        ]
        w = sum(min(math.exp(log_ratio[i, t].item()), clip) for t in ts) / len(ts)
        weights.append(w)
        means.append(sum(d) / len(d))
        total += w * means[-1]
    return total, weights, means


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sdft_full_matches_brute_force_value_and_grad(kind):
    mask, s_logits, t_lp, log_ratio = _sdft_batch(20)
    s_logits.requires_grad_()
    obj = build_objective("sdft", {"divergence": kind, "alpha": 0.3, "estimator": "full"})
    assert obj.normalize_by == "sequences"
    out = obj(_sdft_inputs(s_logits, t_lp, mask, log_ratio))
    (g,) = torch.autograd.grad(out.loss_sum, s_logits)

    want, weights, means = _brute_sdft(kind, s_logits.detach(), t_lp, mask, log_ratio, 0.3)
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-10)
    assert out.n_tokens.item() == len(LENGTHS)  # sequences, not tokens
    assert out.metrics["sdft/divergence"].item() == pytest.approx(sum(means), rel=1e-10)
    assert out.metrics["sdft/is_weight"].item() == pytest.approx(sum(weights), rel=1e-12)
    assert out.metrics["sdft/counted_tokens"].item() == sum(max(0, n - 3) for n in LENGTHS)

    # Gradient: the IS weight is a constant, each counted token has weight w_i / n_i.
    keep = mask.clone()
    keep[:, :3] = 0
    per_token = keep * torch.tensor(weights)[:, None] / keep.sum(-1, keepdim=True).clamp_min(1)
    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = (_ref_full(kind, ref_logits, t_lp, 0.3, 1.0) * per_token).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(g, ref_g, atol=1e-10)
    assert g[1].abs().max() == 0 and g[2].abs().max() == 0  # <= 3 tokens: nothing
    assert g[:, :3].abs().max() == 0  # the first 3 completion tokens are skipped


def test_sdft_skip_first_tokens_do_not_matter():
    mask, s_logits, t_lp, log_ratio = _sdft_batch(21)
    obj = build_objective("sdft", {"estimator": "full"})
    base = obj(_sdft_inputs(s_logits, t_lp, mask, log_ratio)).loss_sum
    s2, t2, r2 = s_logits.clone(), t_lp.clone(), log_ratio.clone()
    s2[:, :3] = _logits(99, s2[:, :3].shape)
    t2[:, :3] = torch.log_softmax(_logits(98, t2[:, :3].shape), -1)
    r2[:, :3] = 5.0
    s2[1:3] = 0.0  # the short sequences: anything at all
    assert obj(_sdft_inputs(s2, t2, mask, r2)).loss_sum.item() == pytest.approx(
        base.item(), rel=1e-14
    )
    short = build_objective("sdft", {"estimator": "full", "skip_first": 0})
    assert short(_sdft_inputs(s2, t2, mask, r2)).loss_sum.item() != pytest.approx(base.item())


def test_sdft_is_weight_is_clipped_and_detached():
    mask, s_logits, t_lp, _ = _sdft_batch(22)
    log_ratio = torch.zeros_like(mask)
    log_ratio[0, 3:] = torch.tensor([math.log(10.0), 0.0, math.log(0.5)], dtype=torch.float64)
    obj = build_objective("sdft", {"estimator": "full"})
    s_logits.requires_grad_()
    x = _sdft_inputs(s_logits, t_lp, mask, log_ratio)  # logprobs_BT depends on s_logits too
    x.logprobs_BT = x.logprobs_BT.detach().requires_grad_()
    out = obj(x)
    w0 = (2.0 + 1.0 + 0.5) / 3  # the ratio 10 is clipped to 2
    assert out.metrics["sdft/is_weight"].item() == pytest.approx(w0 + 1 + 1 + 1, rel=1e-12)
    assert out.metrics["sdft/is_clipped_frac"].item() == pytest.approx(1 / 3, rel=1e-12)
    assert torch.autograd.grad(out.loss_sum, x.logprobs_BT, allow_unused=True)[0] is None
    _, _, means = _brute_sdft("forward_kl", s_logits.detach(), t_lp, mask, log_ratio)
    assert out.loss_sum.item() == pytest.approx(w0 * means[0] + sum(means[1:]), rel=1e-10)
    huge = torch.full_like(mask, 1e4)  # exp would overflow: the clip comes first
    assert torch.isfinite(obj(_sdft_inputs(s_logits.detach(), t_lp, mask, huge)).loss_sum)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sdft_topk_matches_brute_force_and_whole_vocab_equals_full(kind):
    mask, s_logits, t_lp, log_ratio = _sdft_batch(23)
    s_logits.requires_grad_()
    obj = build_objective("sdft", {"divergence": kind, "k": 4})
    out = obj(_sdft_inputs(s_logits, t_lp, mask, log_ratio, k=4))
    (g,) = torch.autograd.grad(out.loss_sum, s_logits)
    s_lp = torch.log_softmax(s_logits.detach(), -1)
    ids = s_lp.topk(4, -1).indices
    _, weights, _ = _brute_sdft(kind, s_logits.detach(), t_lp, mask, log_ratio)
    want = 0.0
    for i, n in enumerate(LENGTHS):
        ts = range(3, n)
        if not ts:
            continue
        d = [
            _brute(
                kind,
                _buckets([s_lp[i, t, v].item() for v in ids[i, t]], 1.0),
                _buckets([t_lp[i, t, v].item() for v in ids[i, t]], 1.0),
            )
            for t in ts
        ]
        want += weights[i] * sum(d) / len(d)
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-10)
    keep = mask.clone()
    keep[:, :3] = 0
    per_token = keep * torch.tensor(weights)[:, None] / keep.sum(-1, keepdim=True).clamp_min(1)
    ref_logits = s_logits.detach().clone().requires_grad_()
    ref = (_ref_topk(kind, ref_logits, t_lp, ids, 0.5, 1.0) * per_token).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_logits)
    assert torch.allclose(g, ref_g, atol=1e-10)

    full = build_objective("sdft", {"divergence": kind, "estimator": "full"})
    whole = build_objective("sdft", {"divergence": kind, "k": V})
    a = full(_sdft_inputs(s_logits.detach(), t_lp, mask, log_ratio)).loss_sum
    b = whole(_sdft_inputs(s_logits.detach(), t_lp, mask, log_ratio, k=V)).loss_sum
    assert b.item() == pytest.approx(a.item(), rel=1e-10)


def test_sdft_teacher_request_and_prompt():
    sdft = build_objective("sdft", {})
    req = sdft.teacher_request()
    assert (req.signal, req.k) == ("at_ids", 20)
    assert build_objective("sdft", {"estimator": "full"}).teacher_request().signal == "full"
    # the teacher's context: the last user turn carries the demonstration, the rest is kept
    system = {"role": "system", "content": "Be brief."}
    sample = Sample(
        0,
        0,
        "p0",
        [system, {"role": "user", "content": "What is 2+2?"}],
        [1],
        [2],
        [0.0],
        "stop",
        0,
        demonstration="2+2 = 4.",
    )
    turn = {"role": "user", "content": teacher_prompt("What is 2+2?", "2+2 = 4.")}
    assert sdft.teacher_messages(sample) == [system, turn]
    assert build_objective("gkd", {}).teacher_messages(sample) is sample.messages
    sample.demonstration = None
    with pytest.raises(ValueError, match="p0.*demonstration_field"):
        sdft.teacher_messages(sample)
    assert teacher_prompt("What is 2+2?", "2+2 = 4.") == (
        "What is 2+2?\n\nThis is an example for a response to the question:\n2+2 = 4.\n\n"
        "Now answer with a response of your own, including the thinking process."
    )


# ---- registry, params, normalization ---------------------------------------------------


def test_registry_and_normalization_units():
    assert {"reverse_kl", "gkd", "sdft"} <= set(REGISTRY)
    assert REGISTRY["reverse_kl"].normalize_by == "tokens"
    lengths = [5, 0, 2]
    assert step_normalizer(build_objective("gkd", {}), lengths) == 7
    assert step_normalizer(build_objective("reverse_kl", {}), lengths) == 7
    assert step_normalizer(build_objective("sdft", {}), lengths) == 3
    assert step_normalizer(Objective(None), lengths) == 7  # the base class's default: tokens


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("gkd", {"beta": 1.5}, "objective.params.beta"),
        ("gkd", {"lmbda": -0.1}, "objective.params.lmbda"),
        ("gkd", {"loss_temperature": 0.0}, "objective.params.loss_temperature"),
        ("gkd", {"temperature": 0.9}, "rollout.temperature"),
        ("gkd", {"estimator": "sampled"}, "objective.params.estimator"),
        ("gkd", {"k": 0}, "objective.params.k"),
        ("gkd", {"betta": 0.1}, "betta"),
        ("sdft", {"divergence": "tv"}, "objective.params.divergence"),
        ("sdft", {"alpha": 2.0}, "objective.params.alpha"),
        ("sdft", {"estimator": "sampled"}, "objective.params.estimator"),
        ("sdft", {"skip_first": -1}, "objective.params.skip_first"),
        ("sdft", {"is_clip": 0.0}, "objective.params.is_clip"),
        ("sdft", {"full_chunk_tokens": 0}, "objective.params.full_chunk_tokens"),
        ("sdft", {"skip_frist": 2}, "skip_frist"),
    ],
)
def test_params_validation_names_the_key(name, params, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_objective(name, params)
