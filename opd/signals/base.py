"""What a teacher signal is: one module owns both halves of what flows from teacher to loss.

An objective asks for a signal by name (`TeacherRequest`). The signal's module holds

- `score`: the teacher-side computation, one typed `Scores` per sample;
- `collate`: those per-sample scores as one micro-batch's, padded;
- `prepare_learner` / `learner_view`: what a learner rank keeps for the signal (e.g. the
  teacher's LM head) and how it turns a micro-batch's scores into what the loss reads;
- `student_ids` / `student_inputs`: what the learner computes on its side for the loss;
- `check`: what the recipe must satisfy (vocabularies, k, tokenizers);

so the scorer, the learner, the loader and the loop call these and never branch on a name.
A new signal is one module with a `Signal` subclass, registered in `opd.signals.SIGNALS`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from opd.modeling.batching import pad_rows

if TYPE_CHECKING:
    from opd.config.schema import Config


@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher must return for each completion: `signal` names a registered signal
    (`opd.signals.SIGNALS`: sampled, at_ids, full, aligned); `k` is its top-k size where it
    has one."""

    signal: str = "sampled"
    k: int = 0

    def __post_init__(self) -> None:
        from opd.signals import signal_of

        signal_of(self).check_request(self)

    @property
    def rollout_topk(self) -> int:
        """How many top log-probs per token the rollout engine must return."""
        from opd.signals import signal_of

        return signal_of(self).rollout_topk(self)


@dataclass
class Scores:
    """A teacher's scores for one sample (batch dimension 1) or one micro-batch. The default
    `collate` pads every tensor field along dimension 1 (completion positions) and stacks the
    rows; signals whose scores are not per position override it."""

    def to(self, device) -> Scores:
        return type(self)(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    @classmethod
    def collate(cls, parts: list[Scores], T: int) -> Scores:
        out = {}
        for f in fields(cls):
            rows = [getattr(p, f.name) for p in parts]
            out[f.name] = pad_rows([r[0] for r in rows], T) if rows[0] is not None else None
        return cls(**out)


class Signal:
    """Base class: the hooks with their defaults (a same-tokenizer signal, no top-k)."""

    name: ClassVar[str]
    Scores: ClassVar[type[Scores]]
    # the teacher scores the student's own token ids (a held-out reverse KL can be measured)
    scores_student_tokens: ClassVar[bool] = True
    # the teacher's log-probs of the given tokens are all it needs, which a vLLM teacher
    # (`teacher.engine: vllm`, prompt log-probs) can return
    served_by_vllm: ClassVar[bool] = False

    def check_request(self, request: TeacherRequest) -> None:
        """Raise ValueError for a request this signal cannot serve."""

    def rollout_topk(self, request: TeacherRequest) -> int:
        return 0

    def check(self, cfg: Config, request: TeacherRequest, vocab: dict[str, int | None]) -> None:
        """Recipe checks before anything starts; `vocab` holds the student's and the teacher's
        vocabulary sizes where known. Raise ValueError naming the key."""
        s, t = vocab.get("student"), vocab.get("teacher")
        if s and t and s != t:
            raise ValueError(
                f"student vocab {s} != teacher vocab {t}: objective {cfg.objective.name!r} "
                "scores the student's token ids with the teacher, so both must share a tokenizer"
            )

    def report(self, teacher: Any) -> list[str]:
        """Lines printed at start-up about `teacher` and the student (e.g. their tokenizers)."""
        return []

    def score(self, teacher: Any, samples: list, request: TeacherRequest) -> list[Scores]:
        """One `Scores` per sample (batch dimension 1, on the host), by `teacher`: an
        `opd.teacher.scorer.TeacherScorer` (its model, tokenizer, prompts and budgets)."""
        raise NotImplementedError

    def prepare_learner(self, teacher_cfg: Any, teacher_path: str | None, device) -> Any:
        """What a learner rank keeps for this signal, built once at its start (None here)."""
        return None

    def learner_view(self, scores: Scores, state: Any) -> Scores:
        """A micro-batch's scores, on the learner's device, as the loss reads them."""
        return scores

    def student_ids(self, scores: Scores) -> Tensor | None:
        """Token ids at which the learner also needs its log-probs ([B, T, K]), or None."""
        return None

    def student_inputs(self, model, hidden_BTH: Tensor, scores: Scores) -> dict[str, Any]:
        """Extra `LossInputs` fields the learner computes from its final hidden states."""
        return {}


def _to(x: Tensor | None, device) -> Tensor | None:
    return x.to(device) if x is not None else None
