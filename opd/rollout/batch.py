"""What flows between the roles: sampled completions and the teacher's scores for them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opd.objectives.base import AlignedScores


def sample_seed(
    run_seed: int, step: int, prompt_index: int, sample_index: int, stream: str = "train"
) -> int:
    """The sampling seed of one completion: a pure function of where it sits in the run."""
    key = f"{stream}/{run_seed}/{step}/{prompt_index}/{sample_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (2**31 - 1)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    seed: int
    key: tuple[int, int]  # (prompt_index, sample_index) within the step


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_id: str
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # rollout engine's log pi_old of each completion token
    finish_reason: str
    policy_version: int
    topk_ids: list[list[int]] | None = None  # the engine's top-k ids per position, if asked
    teacher: dict[str, Tensor] = field(default_factory=dict)  # filled by the teacher scorer
    teacher_version: int = 0
    demonstration: str | None = None  # the teacher's extra context (sdft), if any
    on_policy: bool = True  # False for dataset completions (gkd's off-policy batches)
    # the sampling temperature: `logprobs` are of pi_old with its logits divided by it, and the
    # learner computes its log-probs of these tokens the same way
    temperature: float = 1.0

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class MicroBatch:
    """Right-padded tensors for one learner forward/backward; `_BT` covers completions."""

    input_ids_BL: Tensor
    attention_mask_BL: Tensor
    positions_BT: Tensor  # index into L of the hidden state that predicts each target
    targets_BT: Tensor
    mask_BT: Tensor
    old_logprobs_BT: Tensor
    teacher_logprobs_BT: Tensor | None  # None when the teacher sent aligned scores
    topk_ids_BTK: Tensor | None = None
    teacher_logprobs_BTK: Tensor | None = None
    teacher_logits_BTV: Tensor | None = None
    aligned: AlignedScores | None = None
    temperature: float = 1.0  # the samples' sampling temperature (one per micro-batch)


def _pad(rows: list[Tensor], length: int, value: float = 0) -> Tensor:
    shape = (len(rows), length, *rows[0].shape[1:])
    out = torch.full(shape, value, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def collate(samples: list[Sample], pad_id: int = 0) -> MicroBatch:
    temperatures = {s.temperature for s in samples}
    if len(temperatures) > 1:
        raise ValueError(f"a micro-batch mixes sampling temperatures {sorted(temperatures)}")
    seqs = [torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long) for s in samples]
    L = max(len(s) for s in seqs)
    T = max(1, max(s.n_tokens for s in samples))
    positions = [
        torch.arange(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + s.n_tokens) for s in samples
    ]

    def col(fn, dtype=torch.float32):
        return _pad([torch.as_tensor(fn(s), dtype=dtype) for s in samples], T)

    batch = MicroBatch(
        input_ids_BL=_pad(seqs, L, pad_id),
        attention_mask_BL=_pad([torch.ones(len(s), dtype=torch.long) for s in seqs], L),
        positions_BT=_pad(positions, T),
        targets_BT=col(lambda s: s.completion_ids, torch.long),
        mask_BT=col(lambda s: [1.0] * s.n_tokens),
        old_logprobs_BT=col(lambda s: s.logprobs),
        temperature=temperatures.pop(),
        teacher_logprobs_BT=(
            col(lambda s: s.teacher["logprobs"]) if "logprobs" in samples[0].teacher else None
        ),
    )
    if samples[0].topk_ids is not None:
        batch.topk_ids_BTK = _pad(
            [torch.tensor(s.topk_ids, dtype=torch.long).reshape(s.n_tokens, -1) for s in samples], T
        )
    if "logprobs_at_ids" in samples[0].teacher:
        batch.teacher_logprobs_BTK = _pad([s.teacher["logprobs_at_ids"] for s in samples], T)
    if "logits_full" in samples[0].teacher:
        batch.teacher_logits_BTV = _pad([s.teacher["logits_full"] for s in samples], T)
    if "aligned_segments" in samples[0].teacher:
        batch.aligned = collate_aligned([s.teacher for s in samples])
    return batch


def collate_aligned(teacher: list[dict[str, Tensor]]) -> AlignedScores:
    """The rows' aligned scores as one K-segment batch (row order, then text order)."""
    segments = [t["aligned_segments"].reshape(-1, 4) for t in teacher]
    rows = torch.cat(
        [torch.full((len(seg),), b, dtype=torch.long) for b, seg in enumerate(segments)]
    )
    s0, s1, t0, t1 = torch.cat(segments).unbind(-1)
    return AlignedScores(
        batch_K=rows,
        student_start_K=s0,
        student_len_K=s1 - s0,
        teacher_len_K=t1 - t0,
        teacher_shared_KS=torch.cat([t["aligned_shared"] for t in teacher]),
        teacher_span_K=torch.cat([t["aligned_span"] for t in teacher]),
        student_vocab_S=teacher[0]["aligned_vocab"],
    )
