"""Reverse KL of the student to the teacher: on-policy distillation
(docs/objectives.md#reverse_kl).

Three estimators of KL(pi_theta || pi_T) on the student's own tokens:

- `sampled`: per-token advantage A_t = -c (log pi_old - log pi_T), optionally discounted by
  gamma along the completion; loss = -sum_t ratio_t A_t with ratio_t = pi_theta / pi_old.
  The teacher only scores the sampled token. With `reward_coef` w != 0, every token of a
  sequence also gets w x its group-normalized outcome reward (`opd.objectives.advantages`):
  A_t += w A_group, "OPD mixed with a verifiable reward" (docs/objectives.md#reward-mixing).
- `topk`: analytic KL on the student's top-k support (the rollout engine's top-k) plus one
  tail bucket per side holding the remaining mass.
- `full`: analytic KL over the whole vocabulary, in token chunks so that the fp32
  log-softmax of both models is only ever held for one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from opd.objectives.advantages import token_advantages, with_anchor
from opd.objectives.base import LossInputs, LossOutput, Normalizer, Objective, TeacherRequest
from opd.objectives.divergences import full_divergence
from opd.objectives.grpo import require_groups

if TYPE_CHECKING:
    from opd.config.schema import Config

ESTIMATORS = ("sampled", "topk", "full")
_TAIL_FLOOR = 1e-6


@dataclass
class ReverseKLParams:
    estimator: str = "sampled"
    coef: float = 1.0  # c: scale of the sampled advantage
    gamma: float = 0.0  # discount of future per-token advantages (sampled only)
    k: int = 64  # support size for `topk`
    full_chunk_tokens: int = 256  # tokens per chunk for `full`
    # `sampled` with stale samples (rollout.max_staleness > 0): PPO-style pessimistic clip of
    # the ratio pi_theta / pi_old to [1 - eps, 1 + eps]; 0 leaves the ratio unclipped.
    ratio_clip: float = 0.0
    # `sampled` only: weight of the group-normalized outcome reward added to every token's
    # advantage (needs rewards and rollout.samples_per_prompt >= 2); 0 leaves it out.
    reward_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"objective.params.estimator={self.estimator!r}; valid: {', '.join(ESTIMATORS)}"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"objective.params.gamma={self.gamma} must lie in [0, 1]")
        if self.k < 1:
            raise ValueError(f"objective.params.k={self.k} must be >= 1")
        if not 0.0 <= self.ratio_clip < 1.0:
            raise ValueError(f"objective.params.ratio_clip={self.ratio_clip} must lie in [0, 1)")
        if not math.isfinite(self.reward_coef):
            raise ValueError(f"objective.params.reward_coef={self.reward_coef} must be finite")
        if self.reward_coef and self.estimator != "sampled":
            raise ValueError(
                f"objective.params.reward_coef={self.reward_coef} mixes rewards into the "
                f"sampled estimator's advantage only; estimator={self.estimator!r} has none "
                "(use estimator: sampled, or reward_coef: 0)"
            )


def discounted_returns(values_BT: Tensor, mask_BT: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{u >= t, masked} gamma^(u - t) v_u along each row (masked positions give 0)."""
    if gamma == 0.0:
        return values_BT * mask_BT
    out = torch.zeros_like(values_BT)
    running = torch.zeros_like(values_BT[:, 0])
    for t in range(values_BT.shape[1] - 1, -1, -1):
        running = values_BT[:, t] * mask_BT[:, t] + gamma * running
        out[:, t] = running
    return out * mask_BT


def topk_reverse_kl(student_lp_BTK: Tensor, teacher_lp_BTK: Tensor) -> Tensor:
    """Per-token KL(p || q) on a k-token support plus a tail bucket on each side."""
    p = student_lp_BTK.exp()
    q = teacher_lp_BTK.exp()
    kl = (p * (student_lp_BTK - teacher_lp_BTK)).sum(-1)
    p_tail = (1.0 - p.sum(-1)).clamp_min(_TAIL_FLOOR)
    q_tail = (1.0 - q.sum(-1)).clamp_min(_TAIL_FLOOR)
    return kl + p_tail * (p_tail.log() - q_tail.log())


def full_reverse_kl(student_logits_BTV: Tensor, teacher_lp_BTV: Tensor, chunk: int) -> Tensor:
    """Per-token KL(softmax(student) || teacher) over the vocabulary, `chunk` tokens at a time."""
    return full_divergence(student_logits_BTV, teacher_lp_BTV, "reverse_kl", chunk=chunk)


class ReverseKL(Objective):
    name: ClassVar[str] = "reverse_kl"
    Params: ClassVar[type] = ReverseKLParams
    normalize_by: ClassVar[Normalizer] = "tokens"

    def teacher_request(self) -> TeacherRequest:
        return {
            "sampled": TeacherRequest("sampled"),
            "topk": TeacherRequest("at_ids", k=self.params.k),
            "full": TeacherRequest("full"),
        }[self.params.estimator]

    def uses_sampler_logprobs(self) -> bool:
        return self.params.estimator == "sampled"  # the ratio pi_theta / pi_old

    def uses_rewards(self) -> bool:
        return self.params.reward_coef != 0

    def anchor_use(self) -> str | None:
        return "advantage" if self.params.estimator == "sampled" else None

    def check(self, cfg: Config) -> None:
        if self.uses_rewards():
            require_groups(self.name, cfg)

    def __call__(self, x: LossInputs) -> LossOutput:
        p, mask = self.params, x.mask_BT
        n_tokens = mask.sum()
        # The sampled estimate log pi_old - log pi_T, reported whatever the estimator.
        sampled_kl = (x.old_logprobs_BT - x.teacher.logprobs_BT) * mask
        metrics = {"reverse_kl/sampled_kl": sampled_kl.sum().detach()}

        if p.estimator == "sampled":
            advantage = discounted_returns(-p.coef * sampled_kl, mask, p.gamma).detach()
            if p.reward_coef:
                reward_adv = p.reward_coef * token_advantages(x, self.name).detach()
                advantage = advantage + reward_adv
                metrics["reverse_kl/reward_advantage"] = reward_adv.sum()
            advantage, anchor_metrics = with_anchor(advantage, x)
            metrics.update(anchor_metrics)
            ratio = torch.exp(x.logprobs_BT - x.old_logprobs_BT.detach())
            surrogate = ratio * advantage
            if p.ratio_clip:
                clipped = ratio.clamp(1.0 - p.ratio_clip, 1.0 + p.ratio_clip) * advantage
                surrogate = torch.minimum(surrogate, clipped)
                outside = (ratio.detach() - 1.0).abs() > p.ratio_clip
                metrics["reverse_kl/clipped"] = (outside.to(mask.dtype) * mask).sum()
            loss_sum = -(surrogate * mask).sum()
            metrics["reverse_kl/ratio"] = (ratio.detach() * mask).sum()
            # how far the learner has moved from the sampling policy (0 when on-policy)
            log_ratio = (x.logprobs_BT.detach() - x.old_logprobs_BT).abs()
            metrics["reverse_kl/abs_log_ratio"] = (log_ratio * mask).sum()
        elif p.estimator == "topk":
            if x.student_logprobs_BTK is None or x.teacher.logprobs_BTK is None:
                raise ValueError("reverse_kl topk needs student and teacher log-probs at ids")
            kl_BT = topk_reverse_kl(x.student_logprobs_BTK, x.teacher.logprobs_BTK)
            loss_sum = (kl_BT * mask).sum()
            metrics["reverse_kl/analytic_kl"] = (kl_BT.detach() * mask).sum()
            metrics["reverse_kl/student_topk_mass"] = (
                x.student_logprobs_BTK.detach().exp().sum(-1) * mask
            ).sum()
            metrics["reverse_kl/teacher_mass_on_student_topk"] = (
                x.teacher.logprobs_BTK.exp().sum(-1) * mask
            ).sum()
        else:
            if x.student_logits_BTV is None or x.teacher.logits_BTV is None:
                raise ValueError("reverse_kl full needs student logits and teacher log-probs")
            kl_BT = full_reverse_kl(x.student_logits_BTV, x.teacher.logits_BTV, p.full_chunk_tokens)
            loss_sum = (kl_BT * mask).sum()
            metrics["reverse_kl/analytic_kl"] = (kl_BT.detach() * mask).sum()
            metrics.update(
                _topk_overlap(x.student_logits_BTV.detach(), x.teacher.logits_BTV, mask, k=8)
            )
        return LossOutput(loss_sum=loss_sum, n_tokens=n_tokens, metrics=metrics)


def _topk_overlap(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, k: int
) -> dict[str, Tensor]:
    """Health metrics: each side's top-k mass and the fraction of shared top-k ids."""
    k = min(k, student_logits_BTV.shape[-1])
    s_top = torch.log_softmax(student_logits_BTV.float(), -1).topk(k, -1)
    t_top = torch.log_softmax(teacher_logits_BTV.float(), -1).topk(k, -1)
    shared = (s_top.indices.unsqueeze(-1) == t_top.indices.unsqueeze(-2)).any(-1).float()
    return {
        "reverse_kl/student_topk_mass": (s_top.values.exp().sum(-1) * mask_BT).sum(),
        "reverse_kl/teacher_topk_mass": (t_top.values.exp().sum(-1) * mask_BT).sum(),
        "reverse_kl/topk_overlap": (shared.mean(-1) * mask_BT).sum(),
    }
