"""What an objective is: a declared teacher request, typed inputs, and a pure loss function.

An objective subclasses `Objective`, whose hooks say everything the rest of opd needs to know
about it: what it asks of the teacher (`teacher_request`, a signal of `opd.signals`, and the
conversation the teacher sees, `teacher_messages`), its normalizer, whether a step trains on
student samples, its recipe checks and its metric finalization. Nothing outside `objectives/`
reads an objective's name or params. The math of each objective: docs/objectives.md.

Objectives return a loss *sum* and the number of units it covers; the learner normalizes
across micro-batches and data-parallel ranks. Metrics are sums over the same units, named
`"<objective>/<metric>"`; the learner divides them by the same count.

The unit is the objective's `normalize_by`:

- `"tokens"` (the default; token-mean losses): `loss_sum` and metrics are sums over completion
  tokens, `n_tokens` counts this micro-batch's tokens, and the learner divides by the number
  of completion tokens in the whole step (all micro-batches, all ranks).
- `"sequences"` (per-sequence-mean losses, e.g. sdft): `loss_sum` and metrics are sums over
  sequences of per-sequence values, `n_tokens` counts this micro-batch's sequences, and the
  learner divides by the number of sequences in the whole step.

`step_normalizer(objective, completion_lengths)` computes that global count.

A token sum cannot be turned into a mean of per-sequence means afterwards, hence the switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor

from opd.modeling.logprobs import at_least_fp32
from opd.signals.aligned import LogitsAt
from opd.signals.base import Scores, TeacherRequest

if TYPE_CHECKING:
    from opd.config.schema import Config

Normalizer = Literal["tokens", "sequences"]

__all__ = [
    "LogitsAt",
    "LossInputs",
    "LossOutput",
    "Normalizer",
    "Objective",
    "TeacherRequest",
    "at_least_fp32",
    "step_normalizer",
]


def step_normalizer(objective: Objective, completion_lengths: Sequence[int]) -> int:
    """What the learner divides one optimizer step's loss sums and metric sums by.

    `completion_lengths` holds every sample of the step (all ranks)."""
    by = objective.normalize_by
    if by == "tokens":
        return max(1, sum(completion_lengths))
    if by == "sequences":
        return max(1, len(completion_lengths))
    raise ValueError(f"normalize_by={by!r}; valid: tokens, sequences")


@dataclass
class LossInputs:
    """One micro-batch, on the learner's device. `_BT` tensors cover completion positions.

    `logprobs_BT` and `old_logprobs_BT` are log-probs of the distribution the rollout sampled
    from, softmax(logits / `temperature`), so that their ratio is 1 on-policy; everything
    over the vocabulary (`student_logprobs_BTK`, `student_logits_BTV`, the teacher's scores)
    is at temperature 1, the models' own distributions (docs: the teacher's temperature).
    `teacher` is the requested signal's `Scores` (e.g. `opd.signals.at_ids.AtIdsScores`); the
    `student_*` fields are what that signal has the learner compute on its side.
    `advantages_B` is filled for objectives whose `uses_rewards()` is true, None otherwise."""

    logprobs_BT: Tensor  # learner, with grad, at the sampled tokens, at `temperature`
    old_logprobs_BT: Tensor  # rollout engine, at the sampled tokens, at `temperature`
    mask_BT: Tensor  # 1.0 on completion tokens that count
    teacher: Scores
    student_logprobs_BTK: Tensor | None = None  # at_ids: learner, with grad, at teacher.ids_BTK
    student_logits_BTV: Tensor | None = None  # full: learner, with grad, raw logits
    targets_BT: Tensor | None = None  # the sampled completion tokens
    student_logits: LogitsAt | None = None  # aligned: learner, with grad, logits on demand
    temperature: float = 1.0  # the rollout's sampling temperature
    # objectives that use rewards: one group-normalized advantage per sequence, float32
    advantages_B: Tensor | None = None
    # multi-turn trajectories: each completion token's step (assistant turn, from 0); tool
    # output is already out of `mask_BT`. None: single-turn samples, one step each
    steps_BT: Tensor | None = None
    # the discriminator anchor (`anchor:`), one term per sequence: added to every token's
    # advantage, or sft's sequence weights (`Objective.anchor_use`); None: no anchor
    anchor_B: Tensor | None = None


@dataclass
class LossOutput:
    loss_sum: Tensor
    n_tokens: Tensor  # units covered: tokens, or sequences if the objective normalizes by them
    metrics: dict[str, Tensor] = field(default_factory=dict)  # sums over the same units, detached


@dataclass
class NoParams:
    """An objective without recipe parameters."""


class Objective:
    """Base class of every objective; each hook has the default most objectives want.

    A subclass sets `name` and `Params` (a dataclass: the recipe's `objective.params`,
    validated strictly; none by default) and implements `__call__`; it overrides the hooks it
    needs.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    normalize_by: ClassVar[Normalizer] = "tokens"  # what the learner divides sums by

    def __init__(self, params: Any) -> None:
        self.params = params

    def teacher_request(self) -> TeacherRequest:
        """What the teacher must return per completion token (a signal of `opd.signals`)."""
        return TeacherRequest("sampled")

    def teacher_messages(self, sample) -> list[dict[str, str]]:
        """The conversation the teacher scores the completion after (its context): the
        student's prompt by default; sdft adds a demonstration."""
        return sample.messages

    def uses_sampler_logprobs(self) -> bool:
        """Whether the loss reads `old_logprobs_BT` (a ratio pi_theta / pi_old). The learner
        reproduces the sampling temperature but not a top-p truncation, so such objectives
        need `rollout.top_p: 1` (checked at validation)."""
        return True

    def uses_rewards(self) -> bool:
        """Whether the loss reads `advantages_B`, the group-normalized outcome rewards
        (`opd.objectives.advantages`): every completion must then be scored with the recipe's
        reward, and the samples of one prompt kept together as a group."""
        return False

    def anchor_use(self) -> str | None:
        """How the discriminator anchor (`anchor:`) joins this objective: "advantage" (its
        term is added to every token's advantage), "weight" (sequence weights), or None (the
        objective has neither: an anchor is refused at validation)."""
        return None

    def use_student_samples(self, step: int, seed: int) -> bool:
        """Whether step `step` trains on student samples (else on dataset completions)."""
        return True

    def check(self, cfg: Config) -> None:
        """Recipe checks beyond `Params` (the data fields it needs, the teacher it can use);
        raise ValueError naming the key."""

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The step's reduced metrics, after the learner divided the sums by the normalizer."""
        return metrics

    def __call__(self, x: LossInputs) -> LossOutput:
        raise NotImplementedError
