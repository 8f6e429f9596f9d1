"""What an objective is: a declared teacher request, typed inputs, and a pure loss function.

An objective declares once (`teacher_request`) what it needs; the rollout and the teacher
scorer compute exactly that, and the learner builds `LossInputs` from it. Objectives return a
loss *sum* and the number of units it covers; the learner normalizes across micro-batches and
data-parallel ranks. Metrics are sums over the same units, named `"<objective>/<metric>"`; the
learner divides them by the same count.

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
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Protocol

import torch
from torch import Tensor

Signal = Literal["sampled", "at_ids", "full", "aligned"]
Normalizer = Literal["tokens", "sequences"]


def step_normalizer(objective: object, completion_lengths: Sequence[int]) -> int:
    """What the learner divides one optimizer step's loss sums and metric sums by.

    `completion_lengths` holds every sample of the step (all ranks). Objectives that do not
    declare `normalize_by` (user-defined ones) normalize by tokens.
    """
    by = getattr(objective, "normalize_by", "tokens")
    if by == "tokens":
        return max(1, sum(completion_lengths))
    if by == "sequences":
        return max(1, len(completion_lengths))
    raise ValueError(f"normalize_by={by!r}; valid: tokens, sequences")


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32 for softmax-type math; leave fp32 and fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher must return for each completion token.

    - `sampled`: log pi_T of the sampled token.
    - `at_ids`: log pi_T at the student's top-`k` token ids (the rollout engine's top-k,
      which the rollout therefore also returns), plus the sampled token.
    - `full`: log pi_T over the whole vocabulary, plus the sampled token.
    - `aligned`: for a teacher with another tokenizer (simct): the completion re-tokenized by
      the teacher and aligned with the student's tokens, and the teacher's half of each
      segment's virtual vocabulary (`AlignedScores`); no per-student-token log-probs.
    """

    signal: Signal = "sampled"
    k: int = 0
    context: Literal["prompt", "demonstration"] = "prompt"

    def __post_init__(self) -> None:
        if self.signal == "at_ids" and self.k < 1:
            raise ValueError("TeacherRequest(signal='at_ids') needs k >= 1")

    @property
    def rollout_topk(self) -> int:
        """How many top log-probs the rollout engine must return per token."""
        return self.k if self.signal == "at_ids" else 0


@dataclass
class AlignedScores:
    """The teacher's half of a cross-tokenizer micro-batch: K segments over its rows (in row
    order, each row's segments in text order) and S shared-vocabulary tokens."""

    batch_K: Tensor  # micro-batch row of each segment
    student_start_K: Tensor  # completion position of the segment's first student token
    student_len_K: Tensor
    teacher_len_K: Tensor
    teacher_shared_KS: Tensor  # raw teacher logits at the segment's start, shared vocabulary
    teacher_span_K: Tensor  # mean raw teacher logit of a span's own tokens (0 on 1:1)
    student_vocab_S: Tensor  # student ids of the shared vocabulary, in the columns' order

    def to(self, device) -> AlignedScores:
        return AlignedScores(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class TeacherScores:
    """The teacher's answer for one batch, aligned with the student's completion tokens."""

    logprobs_BT: Tensor | None  # None for signal "aligned"
    ids_BTK: Tensor | None = None
    logprobs_BTK: Tensor | None = None
    logits_BTV: Tensor | None = None  # raw logits, model dtype (signal "full")
    aligned: AlignedScores | None = None


@dataclass
class LossInputs:
    """One micro-batch, on the learner's device. `_BT` tensors cover completion positions.

    `logprobs_BT` and `old_logprobs_BT` are log-probs of the distribution the rollout sampled
    from, softmax(logits / `temperature`), so that their ratio is 1 on-policy; everything
    over the vocabulary (`student_logprobs_BTK`, `student_logits_BTV`, the teacher's scores)
    is at temperature 1, the models' own distributions (docs: the teacher's temperature)."""

    logprobs_BT: Tensor  # learner, with grad, at the sampled tokens, at `temperature`
    old_logprobs_BT: Tensor  # rollout engine, at the sampled tokens, at `temperature`
    mask_BT: Tensor  # 1.0 on completion tokens that count
    teacher: TeacherScores
    student_logprobs_BTK: Tensor | None = None  # learner, with grad, at teacher.ids_BTK
    student_logits_BTV: Tensor | None = None  # learner, with grad, raw logits (signal "full")
    targets_BT: Tensor | None = None  # the sampled completion tokens
    student_logits: LogitsAt | None = None  # learner, with grad, logits on demand ("aligned")
    temperature: float = 1.0  # the rollout's sampling temperature


@dataclass
class LossOutput:
    loss_sum: Tensor
    n_tokens: Tensor  # units covered: tokens, or sequences if the objective normalizes by them
    metrics: dict[str, Tensor] = field(default_factory=dict)  # sums over the same units, detached


class LogitsAt(Protocol):
    """Raw logits at chosen (row, position) pairs, computed only where asked."""

    def columns(self, rows_K: Tensor, pos_K: Tensor, vocab_S: Tensor) -> Tensor:
        """[K, S]: the logits of tokens `vocab_S` at each (row, position)."""
        ...

    def at(self, rows_N: Tensor, pos_N: Tensor, ids_N: Tensor) -> Tensor:
        """[N]: the logit of token `ids_N[n]` at (row, position) n."""
        ...


class Objective(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type]
    normalize_by: ClassVar[Normalizer]  # what the learner divides loss and metrics by

    def __init__(self, params) -> None: ...

    def teacher_request(self) -> TeacherRequest: ...

    def uses_sampler_logprobs(self) -> bool:
        """Whether the loss reads `old_logprobs_BT` (a ratio pi_theta / pi_old). The learner
        reproduces the sampling temperature but not a top-p truncation, so such objectives
        need `rollout.top_p: 1` (checked at validation)."""
        ...

    def __call__(self, x: LossInputs) -> LossOutput: ...
