"""Signal `aligned`: a teacher with another tokenizer (simct).

The teacher re-tokenizes each completion's text, aligns the two tokenizations into segments
(`opd.signals.alignment`, the `fine` cut, of which every segmentation is a union) and sends
its half of each segment's virtual vocabulary: the raw logits at the segment's start over the
shared vocabulary, and the mean raw logit of the segment's own tokens (`AlignedScores`). The
learner computes the student's half from its hidden states on demand (`LogitsAt`), never a
[B, T, V] tensor. The math that both halves share is `side_logits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from opd.modeling.batching import budget_batches, pad_rows
from opd.modeling.logprobs import HeadLogits, at_least_fp32, final_hidden, gather_positions
from opd.signals.aligned_pair import PROBE_TEXT, TokenizerPair
from opd.signals.alignment import Segment
from opd.signals.base import Scores, Signal, TeacherRequest


class LogitsAt(Protocol):
    """Raw logits at chosen (row, position) pairs, computed only where asked."""

    def columns(self, rows_K: Tensor, pos_K: Tensor, vocab_S: Tensor) -> Tensor:
        """[K, S]: the logits of tokens `vocab_S` at each (row, position)."""
        ...

    def at(self, rows_N: Tensor, pos_N: Tensor, ids_N: Tensor) -> Tensor:
        """[N]: the logit of token `ids_N[n]` at (row, position) n."""
        ...


@dataclass
class AlignedScores(Scores):
    """The teacher's half of a cross-tokenizer batch: K segments over its rows (in row order,
    each row's segments in text order) and S shared-vocabulary tokens."""

    batch_K: Tensor  # row of each segment
    student_start_K: Tensor  # completion position of the segment's first student token
    student_len_K: Tensor
    teacher_len_K: Tensor
    teacher_shared_KS: Tensor  # raw teacher logits at the segment's start, shared vocabulary
    teacher_span_K: Tensor  # mean raw teacher logit of a span's own tokens (0 on 1:1)
    student_vocab_S: Tensor  # student ids of the shared vocabulary, in the columns' order

    @classmethod
    def collate(cls, parts: list[Scores], T: int) -> AlignedScores:
        rows = [torch.full((len(p.batch_K),), b, dtype=torch.long) for b, p in enumerate(parts)]
        return cls(
            batch_K=torch.cat(rows),
            student_start_K=torch.cat([p.student_start_K for p in parts]),
            student_len_K=torch.cat([p.student_len_K for p in parts]),
            teacher_len_K=torch.cat([p.teacher_len_K for p in parts]),
            teacher_shared_KS=torch.cat([p.teacher_shared_KS for p in parts]),
            teacher_span_K=torch.cat([p.teacher_span_K for p in parts]),
            student_vocab_S=parts[0].student_vocab_S,
        )


@dataclass
class SegmentIndex:
    """The K segments of a batch, flattened over its rows (built once, in Python)."""

    batch_K: Tensor  # row of each segment
    student_start_K: Tensor  # completion position of the segment's first student token
    student_len_K: Tensor
    teacher_start_K: Tensor
    teacher_len_K: Tensor

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
    vocab_ids_S: Tensor,
) -> tuple[Tensor, Tensor]:
    """One side's (shared_KS, own_K): raw logits at segment starts on the shared vocabulary,
    and per segment the mean raw logit of its own tokens (a span's virtual entry; on a 1:1
    segment it is only needed when segments are merged into spans).

    Position t of `logits` is the distribution of completion token t (`ids_BT[:, t]`); a
    plain [B, T, V] tensor is accepted too.
    """
    if isinstance(logits, Tensor):
        logits = DenseLogits(logits)
    shared_KS = logits.columns(batch_K, start_K, vocab_ids_S)
    k = torch.arange(len(batch_K), device=batch_K.device)
    seg_N = torch.repeat_interleave(k, len_K)
    first_N = torch.cumsum(len_K, 0)[seg_N] - len_K[seg_N]
    pos_N = start_K[seg_N] + torch.arange(len(seg_N), device=k.device) - first_N
    row_N = batch_K[seg_N]
    own_N = at_least_fp32(logits.at(row_N, pos_N, ids_BT[row_N, pos_N]))
    sums_K = torch.zeros(len(k), dtype=own_N.dtype, device=k.device).index_add(0, seg_N, own_N)
    return shared_KS, sums_K / len_K.clamp_min(1).to(sums_K.dtype)


class Aligned(Signal):
    name: ClassVar[str] = "aligned"
    Scores: ClassVar[type[Scores]] = AlignedScores
    scores_student_tokens: ClassVar[bool] = False

    def check(self, cfg, request: TeacherRequest, vocab: dict[str, int | None]) -> None:
        # the vocabularies may differ: that is the point
        if cfg.teacher.mode != "frozen":
            raise ValueError(
                f"teacher.mode={cfg.teacher.mode!r}: objective {cfg.objective.name!r} distills "
                "from a teacher with another tokenizer, which cannot follow the student's "
                "weights; use teacher.mode=frozen"
            )
        if cfg.agent.enabled:
            raise ValueError(
                f"agent.tools={list(cfg.agent.tools)} with objective {cfg.objective.name!r}: "
                "a trajectory's tool turns are in the student's tokens and chat template, "
                "which a teacher with another tokenizer cannot score; use a same-tokenizer "
                "objective (reverse_kl, gkd, sod, ...)"
            )

    def report(self, teacher) -> list[str]:
        """Start-up lines: the shared vocabulary's size, and warnings where templates or
        special tokens make the texts the two sides read differ."""
        templated = bool(teacher.tokenizer.chat_template)
        r = pair(teacher).report(PROBE_TEXT, uses_chat_template=templated)
        lines = [
            f"cross-tokenizer pair: shared vocabulary {r['shared_vocab']} tokens "
            f"(student {r['student_vocab']}, teacher {r['teacher_vocab']}); probe text "
            f"{r['probe_supervised_fraction']:.0%} supervised, "
            f"{r['probe_one_to_one_fraction']:.0%} 1:1"
        ]
        return lines + [f"warning: {w}" for w in r["warnings"]]

    @torch.no_grad()
    def score(self, teacher, samples: list, request: TeacherRequest) -> list[Scores]:
        p = pair(teacher)
        completions = [p.retokenize(s.completion_ids) for s in samples]
        segments = [p.align(s.completion_ids, c) for s, c in zip(samples, completions, strict=True)]
        prompts = [teacher.prompt_ids(s) for s in samples]
        lengths = [len(a) + len(c) for a, c in zip(prompts, completions, strict=True)]
        out: list[Scores] = [None] * len(samples)  # type: ignore[list-item]
        for idx in budget_batches(lengths, teacher.cfg.token_budget):
            shared, span = _teacher_half(
                teacher,
                p,
                [prompts[i] for i in idx],
                [completions[i] for i in idx],
                [segments[i] for i in idx],
            )
            counts = [len(segments[i]) for i in idx]
            for i, sh, sp in zip(idx, shared.split(counts), span.split(counts), strict=True):
                seg = torch.tensor(segments[i], dtype=torch.long).reshape(-1, 4)
                s0, s1, t0, t1 = seg.unbind(-1)
                out[i] = AlignedScores(
                    batch_K=torch.zeros(len(seg), dtype=torch.long),
                    student_start_K=s0,
                    student_len_K=s1 - s0,
                    teacher_len_K=t1 - t0,
                    teacher_shared_KS=sh.cpu().clone(),
                    teacher_span_K=sp.cpu().clone(),
                    student_vocab_S=p.student_vocab,
                )
        return out

    def student_inputs(self, model, hidden_BTH: Tensor, scores: Scores) -> dict[str, Any]:
        return {"student_logits": HeadLogits(model, hidden_BTH)}


def pair(teacher) -> TokenizerPair:
    """The teacher's tokenizer pair, built once per teacher and kept in its signal state."""
    state = teacher.signal_state
    if "pair" not in state:
        if teacher.student_path is None:
            raise ValueError("signal 'aligned' needs the student's tokenizer (student_path)")
        state["pair"] = TokenizerPair.load(teacher.student_path, teacher.tokenizer)
    return state["pair"]


def _teacher_half(teacher, p: TokenizerPair, prompts, completions, segments):
    d, model = teacher.device, teacher.model
    seqs = [a + c for a, c in zip(prompts, completions, strict=True)]
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    L, U = max(len(r) for r in rows), max(1, max(len(c) for c in completions))
    input_ids = pad_rows(rows, L).to(d)
    attention = pad_rows([torch.ones(len(r), dtype=torch.long) for r in rows], L).to(d)
    positions = pad_rows(
        [torch.arange(len(a) - 1, len(a) - 1 + len(c)) for a, c in zip(prompts, completions)], U
    ).to(d)
    ids = pad_rows([torch.tensor(c, dtype=torch.long) for c in completions], U).to(d)
    hidden = gather_positions(final_hidden(model, input_ids, attention), positions)
    index = SegmentIndex.from_alignments(segments, device=d)
    return side_logits(
        HeadLogits(model, hidden),
        ids,
        index.batch_K,
        index.teacher_start_K,
        index.teacher_len_K,
        p.teacher_vocab.to(d),
    )
