"""Where a recipe's data comes from: a local file or folder, or a `registry:` data set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opd.data.prompts import read_rows

REGISTRY_PREFIX = "registry:"


def _mmath(source: str) -> Callable[[], Path]:
    def prepare() -> Path:
        from opd.cache import cache_root
        from opd.data.registry_data import write_mmath_jsonl

        out = cache_root() / "data" / f"mmath-{source.lower()}.jsonl"
        return write_mmath_jsonl(out, sources=(source,))

    return prepare


def _tiny_prompts() -> Path:
    import json

    from opd.cache import atomic_write_bytes, cache_root
    from opd.models.tiny import synthetic_examples

    path = cache_root() / "data" / "tiny-arithmetic-v2.jsonl"
    if not path.is_file():
        rows = [{"id": f"tiny/{i}", **r} for i, r in enumerate(synthetic_examples(256, 7))]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


REGISTRY_DATA: dict[str, Callable[[], Path]] = {
    "tiny-arithmetic": _tiny_prompts,
    "mmath-math500": _mmath("MATH500"),
    "mmath-aime2024": _mmath("AIME2024"),
}


def resolve_data(path: str) -> Path:
    if path.startswith(REGISTRY_PREFIX):
        name = path[len(REGISTRY_PREFIX) :]
        if name not in REGISTRY_DATA:
            raise ValueError(
                f"unknown data set {path!r}; registry data: {', '.join(REGISTRY_DATA)}"
            )
        return REGISTRY_DATA[name]()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data not found: {p}")
    return p


def check_data_source(path: str, prompt_field: str) -> str:
    """Check a local source's rows carry `prompt_field`; registry sets are checked by tests."""
    if path.startswith(REGISTRY_PREFIX):
        name = path[len(REGISTRY_PREFIX) :]
        if name not in REGISTRY_DATA:
            raise ValueError(
                f"unknown data set {path!r}; registry data: {', '.join(REGISTRY_DATA)}"
            )
        return f"data: {path} (prepared on first use)"
    rows = read_rows(resolve_data(path))
    for i, row in enumerate(rows):
        if prompt_field not in row:
            raise ValueError(f"{path}: row {i} has no field {prompt_field!r} (data.prompt_field)")
    return f"data: {path} ({len(rows)} rows)"
