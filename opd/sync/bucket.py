"""Weights packed into one flat byte buffer and read back as views, for transports that hand
over a single allocation (CUDA IPC between a learner and the vLLM worker on its GPU).

`BucketLayout` says where each weight lives: (name, dtype, shape, byte offset), offsets
aligned so that every slice can be viewed as its dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 256  # bytes


@dataclass(frozen=True)
class BucketEntry:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the bucket

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * getattr(torch, self.dtype).itemsize


def plan(specs: list[tuple[str, str, list[int]]]) -> tuple[list[BucketEntry], int]:
    """Entries for (name, dtype, shape) specs in order, and the bucket's size in bytes."""
    entries, offset = [], 0
    for name, dtype, shape in specs:
        e = BucketEntry(name, dtype, tuple(shape), offset)
        entries.append(e)
        offset += -(-e.nbytes // ALIGN) * ALIGN
    return entries, offset


def view(bucket: torch.Tensor, e: BucketEntry) -> torch.Tensor:
    """Entry `e` of a uint8 `bucket` as a tensor of its dtype and shape (no copy)."""
    return bucket[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)


def views(bucket: torch.Tensor, entries: list[BucketEntry]) -> list[tuple[str, torch.Tensor]]:
    return [(e.name, view(bucket, e)) for e in entries]


def as_rows(entries: list[BucketEntry]) -> list[tuple]:
    """Entries as plain (name, dtype, shape, offset) rows: what survives msgpack, the hop to a
    vLLM engine in its own process (it turns dataclasses into dicts)."""
    return [(e.name, e.dtype, list(e.shape), e.offset) for e in entries]


def from_rows(rows: list) -> list[BucketEntry]:
    return [BucketEntry(name, dtype, tuple(shape), off) for name, dtype, shape, off in rows]
