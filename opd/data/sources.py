"""Where a recipe's data comes from: a local file or folder, or a `registry:` data set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opd.data.prompts import read_located_rows, text_field

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

    path = cache_root() / "data" / "tiny-arithmetic-v3.jsonl"
    if not path.is_file():  # `domain`: what the question counts (routes the two-teacher recipe)
        rows = [
            {"id": f"tiny/{i}", **r, "domain": r["question"].split()[3]}
            for i, r in enumerate(synthetic_examples(256, 7))
        ]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _gsm_symbolic_train() -> Path:
    """1,000 fresh GSM-style training problems from the GSM-Symbolic templates (seed 0), never
    a GSM8K test question verbatim: `question`, `answer` (the final number), `id`."""
    import json

    from opd.cache import atomic_write_bytes, cache_root
    from opd.eval.benchmarks import GSM_SYMBOLIC_TRAIN_DEFAULT, generate_gsm_symbolic

    path = cache_root() / "data" / f"gsm-symbolic-train-0-{GSM_SYMBOLIC_TRAIN_DEFAULT}.jsonl"
    if not path.is_file():
        problems = generate_gsm_symbolic(GSM_SYMBOLIC_TRAIN_DEFAULT, 0)
        rows = [{"id": p.id, "question": p.prompt, "answer": p.answer} for p in problems]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _arith_train() -> Path:
    """2,000 one-step arithmetic word problems (`opd.eval.arith`), none of them in the
    `arith-heldout` benchmark: `question` (with the math benchmarks' instruction, so training
    prompts read like the held-out ones), `answer`, `solution` (one worked line),
    `tool_solution` (the same as a conversation calling python), `id`."""
    import json

    from opd.cache import atomic_write_bytes, cache_root
    from opd.eval.arith import arith_problems
    from opd.eval.runner import MATH_SUFFIX

    path = cache_root() / "data" / "arith-train-v2-0-2000.jsonl"
    if not path.is_file():
        rows = arith_problems(2000, "train")
        rows = [{**r, "question": r["question"] + MATH_SUFFIX} for r in rows]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


REGISTRY_DATA: dict[str, Callable[[], Path]] = {
    "tiny-arithmetic": _tiny_prompts,
    "gsm-symbolic-train": _gsm_symbolic_train,
    "arith-train": _arith_train,
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


def checked_rows(path: str, text_fields: dict[str, str]) -> tuple[Path, list[dict]] | None:
    """A local source's file and rows, each holding text in every field of `text_fields`
    ({field: the recipe key naming it}); errors name the file and line or row. None for a
    registry set, which is named but not prepared (its rows are checked by tests)."""
    if path.startswith(REGISTRY_PREFIX):
        name = path[len(REGISTRY_PREFIX) :]
        if name not in REGISTRY_DATA:
            raise ValueError(
                f"unknown data set {path!r}; registry data: {', '.join(REGISTRY_DATA)}"
            )
        return None
    source = resolve_data(path)
    located = read_located_rows(source)
    if not located:
        raise ValueError(f"{source}: no rows")
    for where, row in located:
        for field, key in text_fields.items():
            text_field(row, field, where, key)
    return source, [row for _, row in located]
