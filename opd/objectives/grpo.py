"""GRPO: a PPO-style clipped surrogate on group-normalized outcome rewards, with no value model
(docs/objectives.md#grpo).

Per completion token t of sequence i, with the ratio r_t = pi_theta(y_t) / pi_old(y_t) (the
learner over the rollout engine, at the sampled token) and A_i the sequence's group advantage
(`opd.objectives.advantages`, handed in as `LossInputs.advantages_B`):

    loss_t = -min(r_t A_i, clip(r_t, 1 - eps_lo, 1 + eps_hi) A_i) + kl_coef * k3_t,
    k3_t = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1,

summed over tokens; the learner divides by the step's completion tokens (token-mean, as DAPO).
The clip is asymmetric by default (0.2 below, 0.28 above, DAPO's "clip higher"). The optional
KL term uses the teacher slot's log-probs at the sampled tokens as pi_ref (k3: DeepSeekMath,
TRL, verl). The base class has no way to ask the teacher for nothing, so the sampled-token
signal is requested even when kl_coef is 0; it is then scored and not read.

`trrd` (`opd.objectives.trrd`) is this loss with a different log-ratio (`log_ratio`), `sod`
(`opd.objectives.sod`) with a different advantage (`advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from opd.objectives.advantages import token_advantages, with_anchor
from opd.objectives.base import LossInputs, LossOutput, Normalizer, Objective, TeacherRequest

if TYPE_CHECKING:
    from opd.config.schema import Config


@dataclass
class GRPOParams:
    eps_lo: float = 0.2  # the ratio is clipped below at 1 - eps_lo
    eps_hi: float = 0.28  # and above at 1 + eps_hi
    kl_coef: float = 0.0  # weight of the k3 KL to the teacher slot (the reference); 0: none

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps_lo < 1.0:
            raise ValueError(f"objective.params.eps_lo={self.eps_lo} must lie in [0, 1)")
        if not self.eps_hi >= 0.0:
            raise ValueError(f"objective.params.eps_hi={self.eps_hi} must be >= 0")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"objective.params.kl_coef={self.kl_coef} must be >= 0")


def clipped_surrogate(
    log_ratio_BT: Tensor, adv_BT: Tensor, eps_lo: float, eps_hi: float
) -> tuple[Tensor, Tensor, Tensor]:
    """min(r A, clip(r, 1 - eps_lo, 1 + eps_hi) A) per token, the ratio r, and where the clip
    is active (the clipped term is the smaller: that token's gradient is 0)."""
    ratio = torch.exp(log_ratio_BT)
    unclipped = ratio * adv_BT
    clipped = ratio.clamp(1.0 - eps_lo, 1.0 + eps_hi) * adv_BT
    return torch.minimum(unclipped, clipped), ratio, (clipped < unclipped).detach()


def k3_kl(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) at tokens sampled from pi_theta:
    exp(d) - d - 1 with d = log pi_ref - log pi_theta; never negative, 0 where they agree."""
    d = ref_logprobs_BT - logprobs_BT
    return torch.exp(d) - d - 1.0


def require_groups(objective: str, cfg: Config) -> None:
    """A group-normalized reward needs several samples per prompt."""
    n = cfg.rollout.samples_per_prompt
    if n < 2:
        raise ValueError(
            f"objective {objective!r} normalizes rewards within the samples of one prompt: "
            f"rollout.samples_per_prompt={n} must be >= 2"
        )


class GRPO(Objective):
    name: ClassVar[str] = "grpo"
    Params: ClassVar[type] = GRPOParams
    normalize_by: ClassVar[Normalizer] = "tokens"

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest("sampled")  # the KL reference; unread when kl_coef is 0

    def uses_rewards(self) -> bool:
        return True

    def anchor_use(self) -> str | None:
        return "advantage"

    def check(self, cfg: Config) -> None:
        require_groups(self.name, cfg)

    def log_ratio(self, x: LossInputs) -> Tensor:
        """log r_t, with gradient through the learner's log-probs: log pi_theta - log pi_old."""
        return x.logprobs_BT - x.old_logprobs_BT.detach()

    def ratio_metrics(self, x: LossInputs) -> dict[str, Tensor]:
        """Metrics about the ratio's parts (token sums); none for GRPO."""
        return {}

    def advantages(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Each token's advantage, [B, T] (0 off the mask), and metrics about it (token
        sums): GRPO's is its sequence's group advantage."""
        return token_advantages(x, self.name), {}

    def __call__(self, x: LossInputs) -> LossOutput:
        p, mask, name = self.params, x.mask_BT, self.name
        counted = mask > 0
        adv, adv_metrics = self.advantages(x)
        adv, anchor_metrics = with_anchor(adv, x)
        # padding never reaches exp(): its ratio is 1 and its gradient 0
        log_ratio = torch.where(counted, self.log_ratio(x), 0.0)
        surrogate, ratio, clip_on = clipped_surrogate(log_ratio, adv, p.eps_lo, p.eps_hi)
        loss_sum = -(surrogate * mask).sum()

        ratio_d = ratio.detach()
        clip_on = clip_on & counted
        metrics = {
            f"{name}/ratio": (ratio_d * mask).sum(),
            f"{name}/clip_frac": clip_on.to(mask.dtype).sum(),
            f"{name}/clip_low_frac": (clip_on & (ratio_d < 1.0)).to(mask.dtype).sum(),
            f"{name}/clip_high_frac": (clip_on & (ratio_d > 1.0)).to(mask.dtype).sum(),
            f"{name}/advantage": adv.sum(),
            f"{name}/abs_advantage": adv.abs().sum(),
            **self.ratio_metrics(x),
            **adv_metrics,
            **anchor_metrics,
        }
        if p.kl_coef:
            ref = torch.where(counted, x.teacher.logprobs_BT, 0.0)
            kl = k3_kl(torch.where(counted, x.logprobs_BT, 0.0), ref)  # padding: 0
            loss_sum = loss_sum + p.kl_coef * (kl * mask).sum()
            metrics[f"{name}/kl"] = (kl.detach() * mask).sum()
        return LossOutput(loss_sum=loss_sum, n_tokens=mask.sum(), metrics=metrics)
