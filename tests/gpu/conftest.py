"""The GPU tier: every test in this folder is marked `gpu`, and where no CUDA device is visible
(the CPU machines of CI and development) it is skipped with the reason, never failed.

    python -m pytest tests/gpu        # on a machine with a GPU
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@cache
def _no_cuda_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return f"needs a CUDA GPU; none is visible here (torch {torch.__version__})"


@pytest.hookimpl(tryfirst=True)  # before `-m` selection reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in item.path.resolve().parents:
            continue  # collection hooks see the whole session's items
        item.add_marker(pytest.mark.gpu)
        reason = _no_cuda_reason()
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
