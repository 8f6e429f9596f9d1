"""A student/teacher tokenizer pair for cross-tokenizer distillation (simct).

Holds the shared vocabulary (computed once), re-tokenizes student completions for the teacher,
aligns the two tokenizations, and checks the pair at start-up: how large the shared vocabulary
is, and where templates or special tokens make the two sides read different texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from opd.signals.alignment import Segment, align_ids, retokenize, shared_vocab, token_bytes

# Digits, whitespace runs, LaTeX, code and non-ASCII text: where tokenizers tend to disagree.
PROBE_TEXT = (
    "To solve 12 x 37, write 12 x 37 = 444.  Then \\frac{444}{3} = 148.\n\n"
    "def f(x):\n    return x ** 2  # square\n"
    "Café, naïve, 東京, 🙂 -- done."
)


@dataclass
class TokenizerPair:
    student: object  # transformers tokenizers
    teacher: object
    student_vocab: Tensor  # shared vocabulary: student ids ...
    teacher_vocab: Tensor  # ... and the teacher ids they match, column by column

    @classmethod
    def load(cls, student_path: str, teacher_tokenizer) -> TokenizerPair:
        from transformers import AutoTokenizer

        student = AutoTokenizer.from_pretrained(student_path)
        s_ids, t_ids = shared_vocab(student, teacher_tokenizer)
        return cls(student, teacher_tokenizer, s_ids, t_ids)

    def retokenize(self, student_ids: Sequence[int]) -> list[int]:
        return retokenize(self.student, self.teacher, student_ids)

    def align(
        self, student_ids: Sequence[int], teacher_ids: Sequence[int], segmentation: str = "fine"
    ) -> list[Segment]:
        """The `fine` segments by default: what the scorer sends, since each `authors` segment
        is a union of them (the objective merges them, `opd.objectives.simct.merge_spans`)."""
        return align_ids(self.student, self.teacher, student_ids, teacher_ids, segmentation)

    def report(self, probe: str = PROBE_TEXT, uses_chat_template: bool = True) -> dict:
        warnings = []
        s_eos, t_eos = self.student.eos_token_id, self.teacher.eos_token_id
        if s_eos is None or t_eos is None:
            warnings.append(
                f"no EOS pair (student eos={s_eos}, teacher eos={t_eos}): a completion's end "
                "is never supervised"
            )
        if not uses_chat_template and self.student.chat_template:
            warnings.append(
                "the teacher has no chat template and reads prompts as plain text "
                "(teacher.prompt_format) while the student reads its chat template: the two "
                "condition on different prompt texts"
            )
        teacher_vocab = self.teacher.get_vocab()
        unmatched = [
            tok
            for tok, tid in zip(
                self.student.all_special_tokens, self.student.all_special_ids, strict=True
            )
            if tid != s_eos and tok not in teacher_vocab
        ]
        if unmatched:
            warnings.append(
                f"{len(unmatched)} student special token(s) the teacher reads as plain text if "
                f"sampled mid-completion: {', '.join(sorted(unmatched)[:5])}"
            )
        s_ids = [*self.student(probe, add_special_tokens=False)["input_ids"]]
        if s_eos is not None:
            s_ids.append(s_eos)
        t_ids = self.retokenize(s_ids)
        s_text = b"".join(token_bytes(self.student, s_ids[:-1] if s_eos is not None else s_ids))
        t_text = b"".join(token_bytes(self.teacher, t_ids[:-1] if s_eos is not None else t_ids))
        if s_text != t_text:
            at = next((i for i, (a, b) in enumerate(zip(s_text, t_text)) if a != b), None)
            at = min(len(s_text), len(t_text)) if at is None else at
            warnings.append(
                f"the teacher's tokenizer changes the probe text at byte {at} "
                f"({s_text[at : at + 12]!r} -> {t_text[at : at + 12]!r}): tokens past it "
                "are dropped from supervision"
            )
        segments = self.align(s_ids, t_ids)
        covered = sum(s1 - s0 for s0, s1, _, _ in segments)
        one_to_one = sum(1 for s0, s1, t0, t1 in segments if s1 - s0 == 1 and t1 - t0 == 1)
        return {
            "shared_vocab": len(self.student_vocab),
            "student_vocab": len(self.student),
            "teacher_vocab": len(self.teacher),
            "probe_supervised_fraction": covered / max(1, len(s_ids)),
            "probe_one_to_one_fraction": one_to_one / max(1, len(s_ids)),
            "warnings": warnings,
        }
