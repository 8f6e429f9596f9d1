"""SimCT: cross-tokenizer on-policy distillation (OBJECTIVES.md section 4, arXiv 2605.07711).

Teacher and student tokenize the same completion differently. Three pieces:

- `shared_vocab`: token pairs whose strings match exactly once the byte-level space marker is
  normalized ("Ġ" -> "▁"), plus EOS <-> EOS.
- `align_segments`: walks both tokenizations of the completion and cuts it into segments,
  each either a 1:1 token (identical strings at the same text offset, or both EOS) or a span,
  the shortest run of tokens both sides realize as the same text.
- the loss: per segment, a virtual vocabulary = the shared vocabulary's raw logits at the
  segment's first position, plus, for a span, one entry whose logit is the mean of the raw
  logits of the span's own tokens (on each side along its own tokenization). Reverse KL over
  it, teacher detached, temperature 1; `shared_only` keeps the 1:1 segments alone (baseline).

**Bytes, not strings** (ours): a byte-level BPE splits a multi-byte character over tokens
whose individual decodes are U+FFFD, so per-token decoded strings neither concatenate to the
text nor compare correctly. The alignment therefore measures and compares UTF-8 *bytes*:
`token_bytes` gives each token's exact bytes (byte-level BPE via the GPT-2 byte table;
SentencePiece-style via "▁" -> " " and `<0xHH>` byte fallback), and `align_segments` also
accepts `str` pieces (encoded as UTF-8), which is exact whenever no token splits a character.
Every segment then holds the same bytes on both sides, and the segments concatenate to a
prefix of the completion's bytes.

In the loop (`TeacherRequest("aligned")`): the teacher scorer re-tokenizes each completion,
aligns it, and computes its half of the virtual vocabulary (`side_logits`), so only [K, S]
shared logits and [K] span means travel to the learner (`AlignedScores`). The learner computes
the student's half straight from its hidden states (`LogitsAt`: only the K x S shared columns
and the span tokens' own logits go through the LM head, never a [B, T, V] tensor), and
`SimCT.batch_loss` takes the two halves as a `SimCTBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from opd.objectives.base import (
    AlignedScores,
    LogitsAt,
    LossInputs,
    LossOutput,
    Normalizer,
    TeacherRequest,
    at_least_fp32,
)
from opd.objectives.divergences import reverse_kl

MODES = ("simct", "shared_only")
Segment = tuple[int, int, int, int]  # half-open (student_start, student_end, teacher_start, _end)


# --- tokens as bytes, shared vocabulary ------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in str(backend.decoder)


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """Each token's exact UTF-8 bytes; special tokens give their literal text."""
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    table = _byte_level_decoder()
    out = []
    for tid, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if tid in special:
            out.append(tok.encode())
        elif byte_level:
            out.append(
                bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode()
            )
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(tok.replace("▁", " ").encode())
    return out


def _normalize(token: str) -> str:
    return token.replace("Ġ", "▁")


def shared_vocab(student_tokenizer, teacher_tokenizer) -> tuple[Tensor, Tensor]:
    """(student_ids_S, teacher_ids_S): tokens equal after "Ġ" -> "▁", plus EOS <-> EOS."""
    teacher = {}
    for tok, tid in sorted(teacher_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        teacher.setdefault(_normalize(tok), tid)
    pairs: dict[int, int] = {}
    taken: set[int] = set()
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if s_eos is not None and t_eos is not None:
        pairs[s_eos], taken = t_eos, {t_eos}
    for tok, sid in sorted(student_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        tid = teacher.get(_normalize(tok))
        if tid is not None and sid not in pairs and tid not in taken:
            pairs[sid] = tid
            taken.add(tid)
    student_ids = sorted(pairs)
    return (
        torch.tensor(student_ids, dtype=torch.long),
        torch.tensor([pairs[s] for s in student_ids], dtype=torch.long),
    )


# --- alignment ------------------------------------------------------------------------------


def _as_bytes(pieces: Sequence[str | bytes], eos: int | None) -> list[bytes]:
    out = [p.encode() if isinstance(p, str) else bytes(p) for p in pieces]
    if eos is not None:
        out[eos] = b""  # EOS carries no text, whatever its decoded form
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(k for k in range(n) if a[k] != b[k])


def align_segments(
    student_pieces: Sequence[str | bytes],
    teacher_pieces: Sequence[str | bytes],
    student_eos: int | None = None,
    teacher_eos: int | None = None,
) -> list[Segment]:
    """Half-open (student_start, student_end, teacher_start, teacher_end) segments.

    Walk both sides keeping the accumulated text. When the accumulated texts are equal and
    the next tokens are identical (or both EOS), record a 1:1 boundary and advance both;
    otherwise advance the side whose text is shorter (both if equal but the tokens differ).
    A span closes the first time the two accumulated texts are equal again. Tokens after the
    last boundary are dropped, and so is everything past the texts' longest common prefix.
    """
    s, t = _as_bytes(student_pieces, student_eos), _as_bytes(teacher_pieces, teacher_eos)
    limit = _common_prefix(b"".join(s), b"".join(t))
    segments: list[Segment] = []
    i = j = s0 = t0 = acc_s = acc_t = 0
    while True:
        if acc_s == acc_t and i > s0:  # a span just became jointly realizable
            if acc_s > limit:
                break
            segments.append((s0, i, t0, j))
            s0, t0 = i, j
        if acc_s == acc_t:
            if i == len(s) or j == len(t):
                break
            both_eos = i == student_eos and j == teacher_eos
            neither_eos = i != student_eos and j != teacher_eos
            if both_eos or (neither_eos and s[i] == t[j]):
                acc_s, acc_t, i, j = acc_s + len(s[i]), acc_t + len(t[j]), i + 1, j + 1
                if acc_s > limit:
                    break
                segments.append((s0, i, t0, j))
                s0, t0 = i, j
                continue
            acc_s, acc_t, i, j = acc_s + len(s[i]), acc_t + len(t[j]), i + 1, j + 1
        elif acc_s < acc_t:
            if i == len(s):
                break
            acc_s, i = acc_s + len(s[i]), i + 1
        else:
            if j == len(t):
                break
            acc_t, j = acc_t + len(t[j]), j + 1
    return segments


def eos_index(ids: Sequence[int], eos_id: int | None) -> int | None:
    """The index of a final EOS token, or None."""
    return len(ids) - 1 if ids and eos_id is not None and ids[-1] == eos_id else None


def retokenize(student_tokenizer, teacher_tokenizer, student_ids: Sequence[int]) -> list[int]:
    """The teacher's tokenization of a student completion, with the teacher's EOS if it ended."""
    eos = eos_index(student_ids, student_tokenizer.eos_token_id)
    body = list(student_ids[:eos] if eos is not None else student_ids)
    text = b"".join(token_bytes(student_tokenizer, body)).decode("utf-8", errors="replace")
    ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [teacher_tokenizer.eos_token_id] if eos is not None else ids


def align_ids(
    student_tokenizer, teacher_tokenizer, student_ids: Sequence[int], teacher_ids: Sequence[int]
) -> list[Segment]:
    """`align_segments` on token ids, with each side's final EOS recognized."""
    return align_segments(
        token_bytes(student_tokenizer, student_ids),
        token_bytes(teacher_tokenizer, teacher_ids),
        eos_index(student_ids, student_tokenizer.eos_token_id),
        eos_index(teacher_ids, teacher_tokenizer.eos_token_id),
    )


# --- tensors --------------------------------------------------------------------------------


@dataclass
class SegmentIndex:
    """The K segments of a micro-batch, flattened over its rows (built once, in Python)."""

    batch_K: Tensor  # row of each segment
    student_start_K: Tensor  # completion position of the segment's first student token
    student_len_K: Tensor
    teacher_start_K: Tensor
    teacher_len_K: Tensor

    @property
    def is_span_K(self) -> Tensor:
        """A 1-by-1 segment is a 1:1 token (a 1-by-1 span needs a zero-length token)."""
        return (self.student_len_K != 1) | (self.teacher_len_K != 1)

    @classmethod
    def from_alignments(
        cls, alignments: Sequence[Sequence[Segment]], device: torch.device | str = "cpu"
    ) -> SegmentIndex:
        rows = [(b, *seg) for b, segs in enumerate(alignments) for seg in segs]
        flat = torch.tensor(rows, dtype=torch.long, device=device).reshape(-1, 5)
        b, s0, s1, t0, t1 = flat.unbind(-1)
        return cls(b, s0, s1 - s0, t0, t1 - t0)


@dataclass
class DenseLogits:
    """`LogitsAt` over a materialized [B, T, V] tensor (tests, small models)."""

    logits_BTV: Tensor

    def columns(self, rows_K: Tensor, pos_K: Tensor, vocab_S: Tensor) -> Tensor:
        return self.logits_BTV[rows_K[:, None], pos_K[:, None], vocab_S[None, :]]

    def at(self, rows_N: Tensor, pos_N: Tensor, ids_N: Tensor) -> Tensor:
        return self.logits_BTV[rows_N, pos_N, ids_N]


def side_logits(
    logits: LogitsAt | Tensor,
    ids_BT: Tensor,
    batch_K: Tensor,
    start_K: Tensor,
    len_K: Tensor,
    is_span_K: Tensor,
    vocab_ids_S: Tensor,
) -> tuple[Tensor, Tensor]:
    """One side's (shared_KS, span_K): raw logits at segment starts on the shared vocabulary,
    and per span the mean raw logit of its own tokens (0 on 1:1 segments).

    Position t of `logits` is the distribution of completion token t (`ids_BT[:, t]`); a
    plain [B, T, V] tensor is accepted too.
    """
    if isinstance(logits, Tensor):
        logits = DenseLogits(logits)
    shared_KS = logits.columns(batch_K, start_K, vocab_ids_S)
    span_len_K = torch.where(is_span_K, len_K, torch.zeros_like(len_K))
    k = torch.arange(len(batch_K), device=batch_K.device)
    seg_N = torch.repeat_interleave(k, span_len_K)
    first_N = torch.cumsum(span_len_K, 0)[seg_N] - span_len_K[seg_N]
    pos_N = start_K[seg_N] + torch.arange(len(seg_N), device=k.device) - first_N
    row_N = batch_K[seg_N]
    own_N = logits.at(row_N, pos_N, ids_BT[row_N, pos_N])
    sums_K = torch.zeros(len(k), dtype=own_N.dtype, device=k.device).index_add(0, seg_N, own_N)
    return shared_KS, sums_K / span_len_K.clamp_min(1).to(sums_K.dtype)


@dataclass
class SimCTBatch:
    """Both sides on the virtual vocabulary: K segments, S shared tokens."""

    student_shared_KS: Tensor  # with grad
    student_span_K: Tensor  # with grad; 0 on 1:1 segments
    teacher_shared_KS: Tensor
    teacher_span_K: Tensor
    is_span_K: Tensor  # bool
    student_len_K: Tensor  # student tokens per segment
    teacher_len_K: Tensor
    n_tokens: Tensor  # student completion tokens, dropped ones included


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
    computes the teacher's half in the scorer and the student's in the learner)."""
    is_span = index.is_span_K
    s_shared, s_span = side_logits(
        student_logits_BTV,
        student_ids_BT,
        index.batch_K,
        index.student_start_K,
        index.student_len_K,
        is_span,
        shared[0].to(student_logits_BTV.device),
    )
    t_shared, t_span = side_logits(
        teacher_logits_BUW,
        teacher_ids_BU,
        index.batch_K,
        index.teacher_start_K,
        index.teacher_len_K,
        is_span,
        shared[1].to(teacher_logits_BUW.device),
    )
    return SimCTBatch(
        s_shared,
        s_span,
        t_shared,
        t_span,
        is_span,
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
    student = _virtual_logprobs(batch.student_shared_KS, batch.student_span_K, batch.is_span_K)
    teacher = _virtual_logprobs(batch.teacher_shared_KS, batch.teacher_span_K, batch.is_span_K)
    return reverse_kl(student, teacher.detach())


@dataclass
class SimCTParams:
    mode: str = "simct"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"objective.params.mode={self.mode!r}; valid: {', '.join(MODES)}")


def student_batch(
    logits: LogitsAt, ids_BT: Tensor, aligned: AlignedScores, n_tokens: Tensor
) -> SimCTBatch:
    """The student's half next to the teacher's (`AlignedScores`, from the scorer)."""
    is_span = (aligned.student_len_K != 1) | (aligned.teacher_len_K != 1)
    s_shared, s_span = side_logits(
        logits,
        ids_BT,
        aligned.batch_K,
        aligned.student_start_K,
        aligned.student_len_K,
        is_span,
        aligned.student_vocab_S,
    )
    return SimCTBatch(
        s_shared,
        s_span,
        aligned.teacher_shared_KS,
        aligned.teacher_span_K,
        is_span,
        aligned.student_len_K,
        aligned.teacher_len_K,
        n_tokens,
    )


class SimCT:
    """Loss sum over segments, normalized by the student's completion tokens (the learner's
    usual "tokens" normalizer); `shared_only` keeps the 1:1 segments alone."""

    name: ClassVar[str] = "simct"
    Params: ClassVar[type] = SimCTParams
    normalize_by: ClassVar[Normalizer] = "tokens"

    def __init__(self, params: SimCTParams) -> None:
        self.params = params

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest(signal="aligned")

    def __call__(self, x: LossInputs) -> LossOutput:
        if x.teacher.aligned is None or x.student_logits is None or x.targets_BT is None:
            raise ValueError("simct needs the teacher's aligned scores and the student's logits")
        n_tokens = x.mask_BT.sum()
        return self.batch_loss(
            student_batch(x.student_logits, x.targets_BT, x.teacher.aligned, n_tokens)
        )

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Called by the learner on the step's reduced metrics."""
        return _mean_span_lengths(metrics)

    def batch_loss(self, batch: SimCTBatch) -> LossOutput:
        kl_K = virtual_reverse_kl(batch)
        span = batch.is_span_K
        used = ~span if self.params.mode == "shared_only" else torch.ones_like(span)
        loss_sum = torch.where(used, kl_K, torch.zeros_like(kl_K)).sum()
        return LossOutput(loss_sum=loss_sum, n_tokens=batch.n_tokens, metrics=_metrics(batch, kl_K))


def _metrics(batch: SimCTBatch, kl_K: Tensor) -> dict[str, Tensor]:
    """Sums over student tokens (the learner divides by their count): token counts by kind
    give fractions, `spans` / `span_tokens` give the mean span length."""
    kl, span = kl_K.detach(), batch.is_span_K
    one = batch.student_len_K[~span].sum()
    in_spans = batch.student_len_K[span].sum()
    dtype = kl.dtype
    return {
        "simct/one_to_one_tokens": one.to(dtype),
        "simct/span_tokens": in_spans.to(dtype),
        "simct/dropped_tokens": (batch.n_tokens - one - in_spans).to(dtype),
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
