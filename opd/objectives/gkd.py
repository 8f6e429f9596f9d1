"""Generalized knowledge distillation (GKD; Agarwal et al., TRL's GKDTrainer);
docs/objectives.md#gkd.

Per completion token, the generalized Jensen-Shannon divergence between the student and the
teacher at temperature `loss_temperature`,

    JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M),   M = beta P_T + (1 - beta) P_S,

with beta = 0 exactly forward KL(P_T || P_S) and beta = 1 exactly reverse KL(P_S || P_T);
token-mean over completion tokens (the loss is a token sum; the learner divides by tokens).

`lmbda` is the fraction of batches whose completions are fresh student samples; the others use
the dataset's completions. The loop asks `use_student_samples(step, seed)` which kind a step
is: an independent draw u ~ U[0, 1) per step, as in the paper's Algorithm 1, made a pure
function of (seed, step) so that a resumed run makes the same choices.

Two temperatures, as in TRL's GKDTrainer (measured against TRL 1.16's `generalized_jsd_loss`):
the student samples at `rollout.temperature` (TRL's `temperature`, 0.9 there), and the loss
compares the two models' own distributions, at `loss_temperature` = 1 by default (TRL's
training loss runs at 1). A `loss_temperature` other than 1 divides the student's logits and
the teacher's log-probs by it and renormalizes both (the distillation-temperature variant).
`temperature` is not a parameter: it was the loss temperature (default 0.9) before, and a
recipe that still sets it is refused with a pointer to the two keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from opd.objectives.base import LossInputs, LossOutput, Normalizer, Objective, TeacherRequest
from opd.objectives.divergences import full_divergence, topk_divergence

ESTIMATORS = ("full", "topk")


@dataclass
class GKDParams:
    beta: float = 0.5  # weight of the teacher in the mixture; 0 = forward KL, 1 = reverse KL
    lmbda: float = 0.5  # fraction of batches that are fresh student samples
    loss_temperature: float = 1.0  # temperature of both distributions inside the loss
    temperature: float | None = None  # renamed: refused with a message (see the docstring)
    estimator: str = "full"  # "full": whole vocabulary; "topk": student top-k + tail bucket
    k: int = 64  # support size for `topk`
    full_chunk_tokens: int = 256  # tokens per chunk for `full`

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"objective.params.beta={self.beta} must lie in [0, 1]")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"objective.params.lmbda={self.lmbda} must lie in [0, 1]")
        if self.temperature is not None:
            raise ValueError(
                f"objective.params.temperature={self.temperature}: gkd's loss runs at "
                "objective.params.loss_temperature (default 1, as TRL's GKDTrainer); the "
                "sampling temperature is rollout.temperature"
            )
        if not self.loss_temperature > 0.0:
            raise ValueError(
                f"objective.params.loss_temperature={self.loss_temperature} must be > 0"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"objective.params.estimator={self.estimator!r}; valid: {', '.join(ESTIMATORS)}"
            )
        if self.k < 1:
            raise ValueError(f"objective.params.k={self.k} must be >= 1")
        if self.full_chunk_tokens < 1:
            raise ValueError(
                f"objective.params.full_chunk_tokens={self.full_chunk_tokens} must be >= 1"
            )


def _uniform(seed: int, step: int) -> float:
    """A U[0, 1) draw that is a pure function of (seed, step), the same in every process."""
    digest = hashlib.blake2b(f"gkd/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class GKD(Objective):
    name: ClassVar[str] = "gkd"
    Params: ClassVar[type] = GKDParams
    normalize_by: ClassVar[Normalizer] = "tokens"

    def teacher_request(self) -> TeacherRequest:
        if self.params.estimator == "topk":
            return TeacherRequest("at_ids", k=self.params.k)
        return TeacherRequest("full")

    def uses_sampler_logprobs(self) -> bool:
        return False

    def use_student_samples(self, step: int, seed: int) -> bool:
        """Whether step `step` trains on fresh student samples (else dataset completions)."""
        return _uniform(seed, step) < self.params.lmbda

    def check(self, cfg) -> None:
        lmbda = self.params.lmbda
        if lmbda < 1 and not cfg.data.completion_field:
            raise ValueError(
                f"objective 'gkd' trains on dataset completions (lmbda={lmbda}): set "
                "data.completion_field"
            )
        if lmbda < 1 and self.params.estimator == "topk":
            raise ValueError(
                "dataset completions have no rollout top-k: with objective.params.lmbda < 1 "
                "use objective.params.estimator=full"
            )

    def __call__(self, x: LossInputs) -> LossOutput:
        p, mask = self.params, x.mask_BT
        if p.estimator == "topk":
            if x.student_logprobs_BTK is None or x.teacher.logprobs_BTK is None:
                raise ValueError("gkd topk needs student and teacher log-probs at ids")
            d_BT = topk_divergence(
                x.student_logprobs_BTK, x.teacher.logprobs_BTK, "jsd", p.beta, p.loss_temperature
            )
        else:
            if x.student_logits_BTV is None or x.teacher.logits_BTV is None:
                raise ValueError("gkd full needs student logits and teacher log-probs")
            d_BT = full_divergence(
                x.student_logits_BTV,
                x.teacher.logits_BTV,
                "jsd",
                p.beta,
                p.loss_temperature,
                p.full_chunk_tokens,
            )
        d_BT = torch.where(mask > 0, d_BT, torch.zeros_like(d_BT))
        loss_sum = (d_BT * mask).sum()
        metrics = {"gkd/jsd": loss_sum.detach()}
        if p.estimator == "topk":
            assert x.student_logprobs_BTK is not None and x.teacher.logprobs_BTK is not None
            metrics["gkd/student_topk_mass"] = (
                x.student_logprobs_BTK.detach().exp().sum(-1) * mask
            ).sum()
            metrics["gkd/teacher_mass_on_student_topk"] = (
                x.teacher.logprobs_BTK.exp().sum(-1) * mask
            ).sum()
        return LossOutput(loss_sum=loss_sum, n_tokens=mask.sum(), metrics=metrics)
