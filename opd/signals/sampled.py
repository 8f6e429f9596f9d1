"""Signal `sampled`: log pi_T of each sampled token. Also the teacher forward that the other
same-tokenizer signals (`at_ids`, `full`) extend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.modeling.batching import budget_batches, pad_rows
from opd.modeling.logprobs import final_hidden, gather_positions, head_logits, token_logprobs
from opd.signals.base import Scores, Signal, TeacherRequest


@dataclass
class TokenScores(Scores):
    logprobs_BT: Tensor  # log pi_T of the sampled tokens


class Sampled(Signal):
    name: ClassVar[str] = "sampled"
    Scores: ClassVar[type[Scores]] = TokenScores
    served_by_vllm: ClassVar[bool] = True

    def score(self, teacher, samples: list, request: TeacherRequest) -> list[Scores]:
        if getattr(teacher, "engine", None) is not None:  # a vLLM teacher: prompt log-probs
            seqs = [teacher.prompt_ids(s) + s.completion_ids for s in samples]
            where = [f"prompt {s.prompt_id}" for s in samples]
            return teacher.engine.score(seqs, [s.n_tokens for s in samples], where)
        return [TokenScores(**parts) for parts in teacher_forward(teacher, samples)]


@torch.no_grad()
def teacher_forward(
    teacher, samples: list, ids_of=None, full_logits: bool = False, hidden: bool = False
) -> list[dict[str, Tensor]]:
    """Per sample (batch dimension 1, on the host): `logprobs_BT`, and `logprobs_BTK` at the
    ids `ids_of(sample)` gives ([T, K]), the raw logits `logits_BTV` (model dtype) when
    `full_logits`, the final hidden states `hidden_BTH` when `hidden`. Sequences are packed
    into forward passes by `teacher.cfg.token_budget`."""
    seqs = [teacher.prompt_ids(s) + s.completion_ids for s in samples]
    out: list[dict[str, Tensor]] = [{} for _ in samples]
    for idx in budget_batches([len(s) for s in seqs], teacher.cfg.token_budget):
        batch, batch_seqs = [samples[i] for i in idx], [seqs[i] for i in idx]
        scored = _forward(teacher, batch, batch_seqs, ids_of, full_logits, hidden)
        for i, parts in zip(idx, scored, strict=True):
            out[i] = parts
    return out


def _forward(teacher, samples, seqs, ids_of, full_logits, hidden) -> list[dict[str, Tensor]]:
    d, model = teacher.device, teacher.model
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    L = max(len(r) for r in rows)
    T = max(1, max(s.n_tokens for s in samples))
    input_ids = pad_rows(rows, L).to(d)
    attention = pad_rows([torch.ones(len(r), dtype=torch.long) for r in rows], L).to(d)
    starts = [len(seq) - s.n_tokens for seq, s in zip(seqs, samples, strict=True)]
    positions = pad_rows(
        [torch.arange(st - 1, st - 1 + s.n_tokens) for st, s in zip(starts, samples)], T
    ).to(d)
    targets = pad_rows([torch.tensor(s.completion_ids, dtype=torch.long) for s in samples], T)
    ids = None
    if ids_of is not None:
        ids = pad_rows([ids_of(s) for s in samples], T).to(d)
    hidden_BTH = gather_positions(final_hidden(model, input_ids, attention), positions)
    mask = pad_rows([torch.ones(s.n_tokens) for s in samples], T).to(d)  # padding skips the head
    lp_BT, lp_BTK = token_logprobs(
        model,
        hidden_BTH,
        targets.to(d),
        ids_BTK=ids,
        chunk=teacher.cfg.logprob_chunk_tokens,
        mask_BT=mask,
    )
    # `full`: the raw logits in the model's dtype (half the bytes of fp32 log-probs, and
    # exactly what the head computed); the learner normalizes them chunk by chunk.
    logits_BTV = head_logits(model, hidden_BTH) if full_logits else None
    out = []
    for i, s in enumerate(samples):
        n = s.n_tokens
        parts = {"logprobs_BT": _host(lp_BT[i : i + 1, :n])}
        if lp_BTK is not None:
            parts["logprobs_BTK"] = _host(lp_BTK[i : i + 1, :n])
        if logits_BTV is not None:
            parts["logits_BTV"] = _host(logits_BTV[i : i + 1, :n])
        if hidden:
            parts["hidden_BTH"] = _host(hidden_BTH[i : i + 1, :n])
        out.append(parts)
    return out


def _host(x: Tensor) -> Tensor:
    """A copy of its own on the host: a view would carry the whole batch's storage along."""
    return x.cpu() if x.is_cuda else x.clone()
