"""SimCT: cross-tokenizer on-policy distillation (arXiv 2605.07711;
docs/objectives.md#simct).

Teacher and student tokenize the same completion differently. Three pieces, the first two in
`opd.signals.alignment` (the text half: tokens as exact bytes):

- `shared_vocab`: token pairs whose strings match exactly once the byte-level space marker is
  normalized ("Ġ" -> "▁"), plus EOS <-> EOS.
- `align_segments`: walks both tokenizations of the completion and records a boundary wherever
  both sides have read the same text and the next tokens are identical (or both EOS). Two
  segmentations (docs/simct.md): `authors`, the authors' code (the default), where a segment
  runs from after one boundary through the next, so an unmatched run and the identical token
  that closes it are one segment; and `fine`, which also cuts an unmatched run wherever the
  two texts meet and keeps the closing token a 1:1 segment of its own. Tokens after the last
  boundary are dropped in both.
- the loss: per segment, a virtual vocabulary = the shared vocabulary's raw logits at the
  segment's first position, plus, for a span, one entry whose logit is the mean of the raw
  logits of the segment's own tokens (on each side along its own tokenization). Reverse KL
  over it, teacher detached, temperature 1; `shared_only` keeps the identical tokens alone,
  each at its own position (the baseline).

In the loop (`TeacherRequest("aligned")`): the teacher scorer re-tokenizes each completion,
aligns it with the `fine` cut, which both segmentations are unions of, and computes its half
of each fine segment's virtual vocabulary (`side_logits`), so only [K, S] shared logits and
[K] own-token means travel to the learner (`AlignedScores`). The learner computes the
student's half straight from its hidden states (`LogitsAt`: only the K x S shared columns and
the completion tokens' own logits go through the LM head, never a [B, T, V] tensor), and
`SimCT.batch_loss` takes the two halves as a `SimCTBatch`, merging the fine segments into the
authors' ones (`merge_spans`) unless the recipe asks for `fine`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from opd.objectives.base import (
    LogitsAt,
    LossInputs,
    LossOutput,
    Normalizer,
    Objective,
    TeacherRequest,
    at_least_fp32,
)
from opd.objectives.divergences import reverse_kl
from opd.signals.aligned import AlignedScores, SegmentIndex, side_logits
from opd.signals.alignment import SEGMENTATIONS

MODES = ("simct", "shared_only")


@dataclass
class SimCTBatch:
    """Both sides on the virtual vocabulary: K segments (in row order, each row's in text
    order), S shared tokens. `_span_K` is the mean raw logit of the segment's own tokens, the
    span entry (unused on a 1:1 segment)."""

    batch_K: Tensor  # row of each segment
    student_shared_KS: Tensor  # with grad
    student_span_K: Tensor  # with grad
    teacher_shared_KS: Tensor
    teacher_span_K: Tensor
    student_len_K: Tensor  # student tokens per segment
    teacher_len_K: Tensor
    n_tokens: Tensor  # student completion tokens, dropped ones included

    @property
    def is_span_K(self) -> Tensor:
        """A 1-by-1 segment is a 1:1 token (a 1-by-1 span needs a zero-length token)."""
        return (self.student_len_K != 1) | (self.teacher_len_K != 1)

    def select(self, keep_K: Tensor) -> SimCTBatch:
        k = [getattr(self, f.name)[keep_K] for f in fields(self) if f.name != "n_tokens"]
        return SimCTBatch(*k, self.n_tokens)


def merge_spans(batch: SimCTBatch) -> SimCTBatch:
    """The `authors` segments from the `fine` ones: each run of spans joins the 1:1 segment
    that closes it (a run that nothing closes in its row, which `align_segments` never gives,
    stays one segment). A merged segment keeps its first piece's shared logits; its span
    entry is the mean over all its tokens, from the pieces' means weighted by their lengths."""
    if batch.batch_K.numel() == 0:
        return batch
    row_end_K = torch.ones_like(batch.is_span_K)
    row_end_K[:-1] = batch.batch_K[1:] != batch.batch_K[:-1]
    end_K = ~batch.is_span_K | row_end_K  # a merged segment ends here
    first_K = torch.ones_like(end_K)
    first_K[1:] = end_K[:-1]
    group_K = torch.cumsum(end_K, 0) - end_K.long()
    n = int(end_K.sum())

    def total(x: Tensor) -> Tensor:
        return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group_K, x)

    def mean(own_K: Tensor, len_K: Tensor) -> Tensor:
        own_K = at_least_fp32(own_K)
        weight_K = len_K.to(own_K.dtype)
        return total(own_K * weight_K) / total(weight_K)

    return SimCTBatch(
        batch.batch_K[end_K],
        batch.student_shared_KS[first_K],
        mean(batch.student_span_K, batch.student_len_K),
        batch.teacher_shared_KS[first_K],
        mean(batch.teacher_span_K, batch.teacher_len_K),
        total(batch.student_len_K),
        total(batch.teacher_len_K),
        batch.n_tokens,
    )


def build_simct_batch(
    student_logits_BTV: Tensor,
    student_ids_BT: Tensor,
    teacher_logits_BUW: Tensor,
    teacher_ids_BU: Tensor,
    index: SegmentIndex,
    shared: tuple[Tensor, Tensor],
    n_tokens: Tensor | int,
) -> SimCTBatch:
    """`SimCTBatch` from each side's full logits along its own tokenization (tests; the loop
    computes the teacher's half in the scorer and the student's in the learner). `index`
    holds the `fine` segments, as the scorer sends them."""
    s_shared, s_span = side_logits(
        student_logits_BTV,
        student_ids_BT,
        index.batch_K,
        index.student_start_K,
        index.student_len_K,
        shared[0].to(student_logits_BTV.device),
    )
    t_shared, t_span = side_logits(
        teacher_logits_BUW,
        teacher_ids_BU,
        index.batch_K,
        index.teacher_start_K,
        index.teacher_len_K,
        shared[1].to(teacher_logits_BUW.device),
    )
    return SimCTBatch(
        index.batch_K,
        s_shared,
        s_span,
        t_shared,
        t_span,
        index.student_len_K,
        index.teacher_len_K,
        torch.as_tensor(n_tokens, device=student_logits_BTV.device),
    )


def _virtual_logprobs(shared_KS: Tensor, span_K: Tensor, is_span_K: Tensor) -> Tensor:
    """log-softmax over [shared..., own span entry]; the entry is -inf on 1:1 segments."""
    shared_KS = at_least_fp32(shared_KS)
    span = torch.where(is_span_K, at_least_fp32(span_K), float("-inf"))
    return torch.log_softmax(torch.cat([shared_KS, span[:, None]], -1), -1)


def virtual_reverse_kl(batch: SimCTBatch) -> Tensor:
    """KL(student || teacher) per segment on its virtual vocabulary, teacher detached: [K]."""
    span = batch.is_span_K
    student = _virtual_logprobs(batch.student_shared_KS, batch.student_span_K, span)
    teacher = _virtual_logprobs(batch.teacher_shared_KS, batch.teacher_span_K, span)
    return reverse_kl(student, teacher.detach())


@dataclass
class SimCTParams:
    mode: str = "simct"
    segmentation: str = "authors"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"objective.params.mode={self.mode!r}; valid: {', '.join(MODES)}")
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(
                f"objective.params.segmentation={self.segmentation!r}; "
                f"valid: {', '.join(SEGMENTATIONS)}"
            )


def student_batch(
    logits: LogitsAt, ids_BT: Tensor, aligned: AlignedScores, n_tokens: Tensor
) -> SimCTBatch:
    """The student's half next to the teacher's (`AlignedScores`, from the scorer), on the
    `fine` segments the scorer sent."""
    s_shared, s_span = side_logits(
        logits,
        ids_BT,
        aligned.batch_K,
        aligned.student_start_K,
        aligned.student_len_K,
        aligned.student_vocab_S,
    )
    return SimCTBatch(
        aligned.batch_K,
        s_shared,
        s_span,
        aligned.teacher_shared_KS,
        aligned.teacher_span_K,
        aligned.student_len_K,
        aligned.teacher_len_K,
        n_tokens,
    )


class SimCT(Objective):
    """Loss sum over segments, normalized by the student's completion tokens (the learner's
    usual "tokens" normalizer). `segmentation` cuts the aligned text into segments (`authors`
    merges the scorer's `fine` ones); `shared_only` trains on the identical tokens alone, each
    at its own position, whatever the segmentation."""

    name: ClassVar[str] = "simct"
    Params: ClassVar[type] = SimCTParams
    normalize_by: ClassVar[Normalizer] = "tokens"

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest(signal="aligned")

    def uses_sampler_logprobs(self) -> bool:
        return False  # the virtual-vocabulary KL needs no pi_theta / pi_old ratio

    def __call__(self, x: LossInputs) -> LossOutput:
        if not isinstance(x.teacher, AlignedScores) or x.student_logits is None:
            raise ValueError("simct needs the teacher's aligned scores and the student's logits")
        n_tokens = x.mask_BT.sum()
        return self.batch_loss(student_batch(x.student_logits, x.targets_BT, x.teacher, n_tokens))

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Called by the learner on the step's reduced metrics."""
        return _mean_span_lengths(metrics)

    def batch_loss(self, fine: SimCTBatch) -> LossOutput:
        """`fine`: both halves on the `fine` segments (`align_segments(..., "fine")`)."""
        segments = fine if self.params.segmentation == "fine" else merge_spans(fine)
        kl_K = virtual_reverse_kl(segments)
        if self.params.mode == "simct":
            loss_sum = kl_K.sum()
        elif segments is fine:
            loss_sum = torch.where(fine.is_span_K, torch.zeros_like(kl_K), kl_K).sum()
        else:  # the identical tokens merged into spans count on their own here
            loss_sum = virtual_reverse_kl(fine.select(~fine.is_span_K)).sum()
        matched = fine.student_len_K[~fine.is_span_K].sum()
        metrics = _metrics(segments, kl_K, matched)
        return LossOutput(loss_sum=loss_sum, n_tokens=segments.n_tokens, metrics=metrics)


def _metrics(batch: SimCTBatch, kl_K: Tensor, matched: Tensor) -> dict[str, Tensor]:
    """Sums over student tokens (the learner divides by their count): token counts by kind
    give fractions, `spans` / `span_tokens` give the mean span length. `matched_tokens` are
    the identical tokens (what `shared_only` trains on); the rest describes the segments."""
    kl, span = kl_K.detach(), batch.is_span_K
    one = batch.student_len_K[~span].sum()
    in_spans = batch.student_len_K[span].sum()
    dtype = kl.dtype
    return {
        "simct/one_to_one_tokens": one.to(dtype),
        "simct/span_tokens": in_spans.to(dtype),
        "simct/dropped_tokens": (batch.n_tokens - one - in_spans).to(dtype),
        "simct/matched_tokens": matched.to(dtype),
        "simct/spans": span.sum().to(dtype),
        "simct/teacher_span_tokens": batch.teacher_len_K[span].sum().to(dtype),
        "simct/kl_one_to_one": kl[~span].sum(),
        "simct/kl_span": kl[span].sum(),
        "simct/aligned_kl": kl.sum(),  # both kinds, whatever the mode trains on
    }


def _mean_span_lengths(metrics: dict[str, float]) -> dict[str, float]:
    """Ratios of the step's normalized sums: the mean span length, in each tokenization."""
    spans = metrics.get("simct/spans", 0.0)
    if spans:
        metrics["simct/mean_span_len"] = metrics["simct/span_tokens"] / spans
        metrics["simct/mean_teacher_span_len"] = metrics["simct/teacher_span_tokens"] / spans
    return metrics
