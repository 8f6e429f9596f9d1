"""Supervised fine-tuning: cross-entropy on the dataset's reference completions.

The baseline that self-distillation is compared with. Every step trains on
`data.completion_field` (never on student samples), token-mean over completion tokens. It asks
the teacher for nothing it uses; the sampled-token signal is requested only because every
batch is scored, and is reported as `sft/teacher_nll`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opd.objectives.base import LossInputs, LossOutput, Normalizer, Objective, TeacherRequest


@dataclass
class SFTParams:
    pass


class SFT(Objective):
    name: ClassVar[str] = "sft"
    Params: ClassVar[type] = SFTParams
    normalize_by: ClassVar[Normalizer] = "tokens"

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest("sampled")

    def use_student_samples(self, step: int, seed: int) -> bool:
        return False

    def uses_sampler_logprobs(self) -> bool:
        return False

    def anchor_use(self) -> str | None:
        return "weight"

    def check(self, cfg) -> None:
        if not cfg.data.completion_field:
            raise ValueError(
                "objective 'sft' trains on dataset completions: set data.completion_field"
            )

    def __call__(self, x: LossInputs) -> LossOutput:
        mask = x.mask_BT
        weights = mask  # the anchor's sequence weights (`anchor:`), mean 1 over the step
        if x.anchor_B is not None:
            weights = mask * x.anchor_B.to(mask.dtype)[:, None]
        loss = -(x.logprobs_BT * weights).sum()
        metrics = {
            "sft/nll": -(x.logprobs_BT.detach() * mask).sum(),
            "sft/teacher_nll": -(x.teacher.logprobs_BT * mask).sum(),
        }
        return LossOutput(loss_sum=loss, n_tokens=mask.sum(), metrics=metrics)
