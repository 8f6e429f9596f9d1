"""Per-token divergences between the student and the teacher, shared by gkd and sdft.

Every function here maps log-probabilities to one value per token ([B, T]) and knows nothing
about masks or normalization; the objectives do that. Three divergences, named as in recipes:

- `forward_kl`: KL(P_T || P_S) = sum_v p_T (log p_T - log p_S)
- `reverse_kl`: KL(P_S || P_T) = sum_v p_S (log p_S - log p_T)
- `jsd`: the generalized Jensen-Shannon divergence of GKD (Agarwal et al.),
  JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M), M = beta P_T + (1 - beta) P_S,
  with log M computed in log space (logaddexp, the two-term logsumexp). As in the paper and
  TRL, beta = 0 *is* forward KL and beta = 1 *is* reverse KL: both are special-cased exactly
  (the unscaled JSD_beta itself goes to 0 at either end; JSD_beta / beta -> forward KL).

Two supports:

- `full_divergence`: the whole vocabulary from raw student logits and teacher log-probs, in
  token chunks under activation checkpointing, so the fp32 [chunk, V] intermediates of both
  models exist for one chunk at a time, in the forward and in the backward.
- `topk_divergence`: a k-token support (the student's top-k) plus one tail bucket on each side
  holding the remaining mass, i.e. a (k+1)-outcome distribution.

Temperature (GKD uses 0.9) divides both sides' log-probs by T and renormalizes: on the full
vocabulary this is exactly softmax(logits / T). On a top-k support the tail bucket is treated
as one more outcome before rescaling (**ours**: the tail's own shape is unknown, so this is an
approximation that becomes exact as the tail mass goes to 0).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opd.objectives.base import at_least_fp32

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAIL_FLOOR = 1e-6  # the smallest tail mass; the same floor as reverse_kl's top-k estimator


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    """sum_v p_v (log p_v - log q_v) over the last dim, with 0 log 0 = 0 for -inf log-probs."""
    lp = lp.clamp_min(torch.finfo(lp.dtype).min)
    lq = lq.clamp_min(torch.finfo(lq.dtype).min)
    return (lp.exp() * (lp - lq)).sum(-1)


def forward_kl(student_lp: Tensor, teacher_lp: Tensor) -> Tensor:
    """KL(P_T || P_S) over the last dim of normalized log-probs."""
    return _kl(teacher_lp, student_lp)


def reverse_kl(student_lp: Tensor, teacher_lp: Tensor) -> Tensor:
    """KL(P_S || P_T) over the last dim of normalized log-probs."""
    return _kl(student_lp, teacher_lp)


def generalized_jsd(student_lp: Tensor, teacher_lp: Tensor, beta: float) -> Tensor:
    """JSD_beta over the last dim; beta = 0 is forward KL and beta = 1 reverse KL, exactly."""
    if beta == 0.0:
        return forward_kl(student_lp, teacher_lp)
    if beta == 1.0:
        return reverse_kl(student_lp, teacher_lp)
    s = student_lp.clamp_min(torch.finfo(student_lp.dtype).min)
    t = teacher_lp.clamp_min(torch.finfo(teacher_lp.dtype).min)
    mixture = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * _kl(t, mixture) + (1.0 - beta) * _kl(s, mixture)


def divergence(kind: str, student_lp: Tensor, teacher_lp: Tensor, beta: float = 0.5) -> Tensor:
    """The named divergence over the last dim; `beta` is the JSD mixture weight on the teacher."""
    if kind == "forward_kl":
        return forward_kl(student_lp, teacher_lp)
    if kind == "reverse_kl":
        return reverse_kl(student_lp, teacher_lp)
    if kind == "jsd":
        return generalized_jsd(student_lp, teacher_lp, beta)
    raise ValueError(f"divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")


def _full_chunk(
    student_logits: Tensor, teacher_lp: Tensor, kind: str, beta: float, temperature: float
) -> Tensor:
    s = torch.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)
    t = torch.log_softmax(at_least_fp32(teacher_lp) / temperature, dim=-1)
    return divergence(kind, s, t, beta)


def full_divergence(
    student_logits_BTV: Tensor,
    teacher_lp_BTV: Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk: int = 256,
) -> Tensor:
    """Per-token divergence over the whole vocabulary, `chunk` tokens at a time -> [B, T].

    `student_logits_BTV` are raw logits (with grad); `teacher_lp_BTV` are the teacher's raw
    logits or log-probs at temperature 1, in any float dtype (normalized here, in fp32, chunk
    by chunk; no grad is taken through them).
    """
    B, T, V = student_logits_BTV.shape
    flat_s = student_logits_BTV.reshape(B * T, V)
    flat_t = teacher_lp_BTV.detach().reshape(B * T, V)
    fn = partial(_full_chunk, kind=kind, beta=beta, temperature=temperature)
    parts = []
    for i in range(0, B * T, chunk):
        s, t = flat_s[i : i + chunk], flat_t[i : i + chunk]
        if s.requires_grad:
            parts.append(checkpoint(fn, s, t, use_reentrant=False))
        else:
            parts.append(fn(s, t))
    return torch.cat(parts).reshape(B, T)


def with_tail(lp_BTK: Tensor) -> Tensor:
    """[..., K] log-probs on a support -> [..., K+1]: the support plus log of the rest's mass."""
    lp_BTK = at_least_fp32(lp_BTK)
    tail = (1.0 - lp_BTK.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
    return torch.cat([lp_BTK, tail.log()], dim=-1)


def topk_divergence(
    student_lp_BTK: Tensor,
    teacher_lp_BTK: Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence on a k-token support plus one tail bucket per side -> [B, T].

    Both inputs are log-probs at temperature 1 at the same token ids (the student's with grad).
    """
    s = with_tail(student_lp_BTK)
    t = with_tail(teacher_lp_BTK.detach())
    if temperature != 1.0:
        s = torch.log_softmax(s / temperature, dim=-1)
        t = torch.log_softmax(t / temperature, dim=-1)
    return divergence(kind, s, t, beta)
