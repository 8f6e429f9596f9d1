"""Right-padding rows into one tensor, and grouping sequences into forward passes by a token
budget."""

from __future__ import annotations

import torch
from torch import Tensor


def pad_rows(rows: list[Tensor], length: int, value: float = 0) -> Tensor:
    """[len(rows), length, *trailing]: each row's leading dimension right-padded with `value`."""
    shape = (len(rows), length, *rows[0].shape[1:])
    out = torch.full(shape, value, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices, longest first, so that (rows x longest row) stays within `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
