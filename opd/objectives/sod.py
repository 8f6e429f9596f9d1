"""SOD: step-wise on-policy distillation for multi-turn (tool-calling) trajectories
(arXiv 2605.07725; docs/objectives.md#sod).

A step k is one contiguous assistant turn (`LossInputs.steps_BT`; the tool output between
turns is already out of the mask). Over the model-written tokens of step k of sequence i:

    d_k = mean_t |log pi_old(y_t) - log pi_T(y_t)|          (how far the student has drifted)
    w_1 = 1,   w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)
    A_t = A_GRPO(i) + coef * w_k * (log pi_T(y_t) - log pi_old(y_t))

and A_t goes into GRPO's clipped surrogate (`opd.objectives.grpo`) with the ratio
pi_theta / pi_old, token-mean. A step that drifted more than the first gets a smaller weight
on its teacher term; one that drifted less, at most 1 + delta. Single-turn samples (no
`steps_BT`) are one-step trajectories: w = 1 everywhere. The paper's step numbering starts
at 1; `steps_BT` counts from 0, so its step 0 is the paper's d_1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.objectives.advantages import token_advantages
from opd.objectives.base import LossInputs
from opd.objectives.grpo import GRPO, GRPOParams


@dataclass
class SODParams(GRPOParams):
    coef: float = 1.0  # c: weight of the step-weighted teacher term in the advantage
    delta: float = 0.2  # a later step's weight is at most 1 + delta
    weight_eps: float = 1e-6  # eps in the weight's ratio

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("coef", "delta"):
            if not getattr(self, key) >= 0.0:
                raise ValueError(f"objective.params.{key}={getattr(self, key)} must be >= 0")
        if not self.weight_eps > 0.0:
            raise ValueError(f"objective.params.weight_eps={self.weight_eps} must be > 0")


def step_weights(
    gap_BT: Tensor, mask_BT: Tensor, steps_BT: Tensor | None, eps: float, delta: float
) -> tuple[Tensor, Tensor]:
    """(w, d): each token's step weight and its step's divergence, [B, T], from the
    per-token gap |log pi_old - log pi_T| over the counted tokens (mask > 0)."""
    if steps_BT is None:
        steps_BT = torch.zeros_like(mask_BT, dtype=torch.long)
    counted = (mask_BT > 0).to(gap_BT.dtype)
    K = int(steps_BT.max()) + 1 if steps_BT.numel() else 1
    onehot_BTK = torch.nn.functional.one_hot(steps_BT.clamp(min=0), K).to(gap_BT.dtype)
    onehot_BTK = onehot_BTK * counted[..., None]
    n_BK = onehot_BTK.sum(1)
    d_BK = (onehot_BTK * gap_BT[..., None]).sum(1) / n_BK.clamp(min=1.0)
    w_BK = ((d_BK[:, :1] + eps) / (d_BK + eps)).clamp(max=1.0 + delta)
    w_BK[:, 0] = 1.0
    index = steps_BT.clamp(min=0)
    return torch.gather(w_BK, 1, index), torch.gather(d_BK, 1, index)


class SOD(GRPO):
    name: ClassVar[str] = "sod"
    Params: ClassVar[type] = SODParams

    def advantages(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        p, mask = self.params, x.mask_BT
        counted = mask > 0
        old = x.old_logprobs_BT.detach()
        teacher = x.teacher.logprobs_BT.detach()
        diff = torch.where(counted, teacher - old, 0.0)  # padding: 0, never NaN
        w, d = step_weights(diff.abs(), mask, x.steps_BT, p.weight_eps, p.delta)
        term = p.coef * w * diff * mask
        adv = token_advantages(x, self.name) + term
        first = (x.steps_BT == 0) if x.steps_BT is not None else counted
        later = (~first & counted).to(mask.dtype)
        return adv, {
            f"{self.name}/step_weight": (w * mask).sum(),
            f"{self.name}/later_step_weight": (w * later).sum(),
            f"{self.name}/later_step_tokens": later.sum(),
            f"{self.name}/step_divergence": (d * mask).sum(),
            f"{self.name}/teacher_advantage": term.sum(),
        }
