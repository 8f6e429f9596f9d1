"""Signal `at_ids`: log pi_T at the student's top-k token ids (the rollout engine's top-k,
which the rollout therefore also returns), plus the sampled token's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from opd.signals.base import Scores, Signal, TeacherRequest
from opd.signals.sampled import teacher_forward


@dataclass
class AtIdsScores(Scores):
    logprobs_BT: Tensor  # log pi_T of the sampled tokens
    ids_BTK: Tensor  # the student's top-k ids at each position (from the rollout)
    logprobs_BTK: Tensor  # log pi_T at those ids


def topk_ids(sample) -> Tensor:
    """[T, K]: the rollout's top-k ids of `sample`."""
    if sample.topk_ids is None:
        raise ValueError(
            f"prompt {sample.prompt_id}: signal at_ids needs the rollout's top-k ids, and this "
            "sample has none (a dataset completion?)"
        )
    return torch.tensor(sample.topk_ids, dtype=torch.long).reshape(sample.n_tokens, -1)


class AtIds(Signal):
    name: ClassVar[str] = "at_ids"
    Scores: ClassVar[type[Scores]] = AtIdsScores

    def check_request(self, request: TeacherRequest) -> None:
        if request.k < 1:
            raise ValueError("TeacherRequest(signal='at_ids') needs k >= 1")

    def rollout_topk(self, request: TeacherRequest) -> int:
        return request.k

    def check(self, cfg, request: TeacherRequest, vocab: dict[str, int | None]) -> None:
        super().check(cfg, request, vocab)
        if vocab.get("student") and request.k > vocab["student"]:
            raise ValueError(
                f"objective.params.k={request.k} exceeds the student's vocabulary "
                f"({vocab['student']})"
            )

    def score(self, teacher, samples: list, request: TeacherRequest) -> list[Scores]:
        parts = teacher_forward(teacher, samples, ids_of=topk_ids)
        return [
            AtIdsScores(p["logprobs_BT"], topk_ids(s)[None], p["logprobs_BTK"])
            for s, p in zip(samples, parts, strict=True)
        ]

    def student_ids(self, scores: Scores) -> Tensor:
        return scores.ids_BTK

    def student_inputs(self, model, hidden_BTH: Tensor, scores: Scores) -> dict[str, Any]:
        return {}  # the learner's log-probs at `student_ids` come with its token log-probs
