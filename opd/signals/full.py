"""Signal `full`: the teacher's raw logits over the whole vocabulary, plus the sampled token's
log-prob; the learner computes its own logits over the vocabulary as well."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from opd.modeling.logprobs import head_logits
from opd.signals.base import Scores, Signal, TeacherRequest
from opd.signals.sampled import teacher_forward


@dataclass
class FullScores(Scores):
    logprobs_BT: Tensor  # log pi_T of the sampled tokens
    logits_BTV: Tensor  # raw teacher logits, model dtype


class Full(Signal):
    name: ClassVar[str] = "full"
    Scores: ClassVar[type[Scores]] = FullScores

    def score(self, teacher, samples: list, request: TeacherRequest) -> list[Scores]:
        return [FullScores(**p) for p in teacher_forward(teacher, samples, full_logits=True)]

    def student_inputs(self, model, hidden_BTH: Tensor, scores: Scores) -> dict[str, Any]:
        return {"student_logits_BTV": head_logits(model, hidden_BTH)}
