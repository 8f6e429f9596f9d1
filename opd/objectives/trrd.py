"""TRRD: trust-region ratio distillation, from RLAD (arXiv 2602.22495)
(docs/objectives.md#trrd).

GRPO's clipped surrogate (`opd.objectives.grpo`) on group-normalized outcome rewards, with a
ratio that mixes, in log space, the sampler ratio and a ratio to the teacher:

    log r_t = alpha (log pi_theta - log pi_old) + (1 - alpha) clamp(log pi_theta - log pi_T, -1, 1)

at the sampled token. alpha = 1 is GRPO exactly; a smaller alpha anchors the trust region to
the teacher. Only the teacher term is clamped. The clamp is torch.clamp's: inside [-1, 1] the
gradient flows through the teacher term, outside it that term is constant, so a token whose
student-teacher log-ratio is out of range gets its gradient from the sampler term alone
(scaled by alpha). The teacher's log-probs are the sampled-token signal, detached.

The optional kl_coef term is GRPO's k3 KL to the teacher slot (here the teacher itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.objectives.base import LossInputs
from opd.objectives.grpo import GRPO, GRPOParams

TEACHER_CLAMP = 1.0  # the teacher term is clamped to [-1, 1]


@dataclass
class TRRDParams(GRPOParams):
    alpha: float = 0.5  # weight of the sampler ratio; 1 - alpha goes to the teacher ratio

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"objective.params.alpha={self.alpha} must lie in [0, 1]")


class TRRD(GRPO):
    name: ClassVar[str] = "trrd"
    Params: ClassVar[type] = TRRDParams

    def teacher_term(self, x: LossInputs) -> Tensor:
        """log pi_theta - log pi_T, with gradient, before the clamp."""
        return x.logprobs_BT - x.teacher.logprobs_BT.detach()

    def log_ratio(self, x: LossInputs) -> Tensor:
        a = self.params.alpha
        teacher = self.teacher_term(x).clamp(-TEACHER_CLAMP, TEACHER_CLAMP)
        return a * (x.logprobs_BT - x.old_logprobs_BT.detach()) + (1.0 - a) * teacher

    def ratio_metrics(self, x: LossInputs) -> dict[str, Tensor]:
        """The teacher term before the clamp, and the tokens where the clamp is active."""
        mask = x.mask_BT
        term = torch.where(mask > 0, self.teacher_term(x).detach(), 0.0)
        outside = (term.abs() > TEACHER_CLAMP).to(mask.dtype)
        return {
            f"{self.name}/teacher_log_ratio": term.sum(),
            f"{self.name}/teacher_clamped_frac": outside.sum(),
        }
