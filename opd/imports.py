"""What a recipe names by import path (`pkg.mod:attr`): a user objective, a user reward."""

from __future__ import annotations

import importlib
from typing import Any


def split_import_path(spec: str, key: str, example: str) -> tuple[str, str]:
    """(module, attribute) of `spec`; a ValueError naming `key` if it is not 'pkg.mod:attr'."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{key}={spec!r} must look like {example!r}")
    return module, attr


def import_attr(spec: str, key: str, example: str) -> Any:
    """The attribute `spec` names, imported; an import or lookup failure names `key`."""
    module, attr = split_import_path(spec, key, example)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={spec!r}: {e}") from e
