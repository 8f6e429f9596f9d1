"""Signal `full`: the teacher's distribution over the whole vocabulary, plus the sampled
token's log-prob; the learner computes its own logits over the vocabulary as well.

Two ways to carry the teacher's half (`teacher.full_transport`): its raw logits (V numbers a
token, in the model's dtype), or its final hidden states (H numbers a token, V/H times fewer
bytes: 74x for a 151,936-token vocabulary and H = 2,048), which the learner turns into the
same logits with the teacher's LM head, read once from the teacher's folder. The hidden states
need the head not to move, so `auto` sends them for a frozen teacher in an HF folder only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from torch import Tensor

from opd.modeling.loading import TORCH_DTYPES, check_output_head, load_output_head
from opd.modeling.logprobs import head_logits
from opd.signals.base import Scores, Signal, TeacherRequest
from opd.signals.sampled import teacher_forward


@dataclass
class FullScores(Scores):
    logprobs_BT: Tensor  # log pi_T of the sampled tokens
    logits_BTV: Tensor | None = None  # raw teacher logits, model dtype (what the loss reads)
    hidden_BTH: Tensor | None = None  # or the teacher's final hidden states, to become them


def transport(teacher_cfg) -> str:
    """`teacher.full_transport` resolved: the same answer in the teacher and the learners."""
    if teacher_cfg.full_transport != "auto":
        return teacher_cfg.full_transport
    return "hidden" if teacher_cfg.mode == "frozen" and not teacher_cfg.gguf_file else "logits"


class Full(Signal):
    name: ClassVar[str] = "full"
    Scores: ClassVar[type[Scores]] = FullScores

    def check(self, cfg, request: TeacherRequest, vocab: dict[str, int | None]) -> None:
        super().check(cfg, request, vocab)
        if transport(cfg.teacher) == "hidden":
            from opd.models.sources import resolve_model

            try:
                check_output_head(str(resolve_model(cfg.teacher.path)))
            except (OSError, KeyError, ValueError) as e:
                raise ValueError(
                    f"teacher.full_transport={cfg.teacher.full_transport}: the learner reads "
                    f"the teacher's LM head from its folder and cannot ({e}); set "
                    "teacher.full_transport=logits"
                ) from e

    def score(self, teacher, samples: list, request: TeacherRequest) -> list[Scores]:
        if transport(teacher.cfg) == "hidden":
            parts = teacher_forward(teacher, samples, hidden=True)
        else:
            parts = teacher_forward(teacher, samples, full_logits=True)
        return [FullScores(**p) for p in parts]

    def prepare_learner(self, teacher_cfg, teacher_path: str | None, device) -> Any:
        """The teacher's LM head, where the scores come as hidden states."""
        if teacher_cfg is None or transport(teacher_cfg) != "hidden":
            return None
        return load_output_head(teacher_path, TORCH_DTYPES[teacher_cfg.dtype], device)

    def learner_view(self, scores: Scores, state: Any) -> Scores:
        if scores.hidden_BTH is None:
            return scores
        if state is None:
            raise RuntimeError("full scores came as hidden states, but this learner has no head")
        return replace(scores, logits_BTV=head_logits(state, scores.hidden_BTH), hidden_BTH=None)

    def student_inputs(self, model, hidden_BTH: Tensor, scores: Scores) -> dict[str, Any]:
        return {"student_logits_BTV": head_logits(model, hidden_BTH)}
