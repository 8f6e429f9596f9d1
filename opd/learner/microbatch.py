"""One learner forward/backward's worth of samples, as right-padded tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.modeling.batching import pad_rows
from opd.samples import Sample
from opd.signals.base import Scores


@dataclass
class MicroBatch:
    """Right-padded tensors for one learner forward/backward; `_BT` covers completions."""

    input_ids_BL: Tensor
    attention_mask_BL: Tensor
    positions_BT: Tensor  # index into L of the hidden state that predicts each target
    targets_BT: Tensor
    mask_BT: Tensor
    old_logprobs_BT: Tensor | None  # None: the samples carry none (`rollout.sampler_logprobs`)
    teacher: Scores  # the requested signal's scores, collated by their own type
    temperature: float = 1.0  # the samples' sampling temperature (one per micro-batch)
    advantages_B: Tensor | None = None  # each sample's group-normalized reward, if rewarded
    anchor_B: Tensor | None = None  # each sample's anchor term (`anchor:`), if anchored
    steps_BT: Tensor | None = None  # each token's step (assistant turn) in a trajectory


def collate(samples: list[Sample], pad_id: int = 0) -> MicroBatch:
    temperatures = {s.temperature for s in samples}
    if len(temperatures) > 1:
        raise ValueError(f"a micro-batch mixes sampling temperatures {sorted(temperatures)}")
    if any(s.teacher is None for s in samples):
        raise ValueError("collate: a sample has no teacher scores (was the batch scored?)")
    seqs = [torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long) for s in samples]
    L = max(len(s) for s in seqs)
    T = max(1, max(s.n_tokens for s in samples))
    positions = [
        torch.arange(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + s.n_tokens) for s in samples
    ]

    def col(fn, dtype=torch.float32):
        return pad_rows([torch.as_tensor(fn(s), dtype=dtype) for s in samples], T)

    return MicroBatch(
        input_ids_BL=pad_rows(seqs, L, pad_id),
        attention_mask_BL=pad_rows([torch.ones(len(s), dtype=torch.long) for s in seqs], L),
        positions_BT=pad_rows(positions, T),
        targets_BT=col(lambda s: s.completion_ids, torch.long),
        mask_BT=col(lambda s: [1.0] * s.n_tokens if s.loss_mask is None else s.loss_mask),
        old_logprobs_BT=(
            None if any(s.logprobs is None for s in samples) else col(lambda s: s.logprobs)
        ),
        teacher=type(samples[0].teacher).collate([s.teacher for s in samples], T),
        temperature=temperatures.pop(),
        advantages_B=_advantages(samples),
        anchor_B=(
            torch.tensor([s.anchor for s in samples], dtype=torch.float32)
            if all(s.anchor is not None for s in samples)
            else None
        ),
        steps_BT=(
            col(lambda s: s.step_ids or [0] * s.n_tokens, torch.long)
            if any(s.step_ids is not None for s in samples)
            else None
        ),
    )


def _advantages(samples: list[Sample]) -> Tensor | None:
    """The samples' advantages, or None where the step was not rewarded (all or none are)."""
    given = [s.advantage is not None for s in samples]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("collate: a micro-batch mixes rewarded and unrewarded samples")
    return torch.tensor([s.advantage for s in samples], dtype=torch.float32)
