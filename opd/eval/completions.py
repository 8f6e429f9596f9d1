"""Reading `opd eval --completions`: other systems' outputs as (id, sample, completion) triples.

A jsonl file, one JSON object per line: `{"id": ..., "completion": ..., "sample": ...}`.

* Several rows with one id are several samples of that problem (pass@k, maj@n count them),
  numbered in file order, or by the optional integer `sample`; given on one row, `sample` must
  be given on all, and an (id, sample) pair may appear once.
* A row without `sample` that repeats an earlier row exactly (same id, same completion) still
  counts as a sample (greedy decoding repeats itself), with a warning.
* Problems without a row are left out of the scores: `coverage` in the summary says how many
  were graded, with a warning when not all.

Everything else is an error naming the file and line: a folder or missing file, text that is not
UTF-8, a line that is not a JSON object, a missing or non-text field, ids the benchmark lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from opd.data.prompts import jsonl_lines

EXAMPLES = 3  # problems shown in an error or warning


@dataclass
class Completions:
    items: list[tuple[str, int, str]]  # (problem id, sample index, completion)
    warnings: list[str] = field(default_factory=list)


def _lines(path: Path):
    """(line number, text) of the non-blank lines; errors name the file and line."""
    if not path.exists():
        raise FileNotFoundError(f"completions file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; --completions takes a jsonl file")
    yield from jsonl_lines(path)


def _row(path: Path, line_no: int, text: str) -> tuple[str, str, int | None]:
    """(id, completion, sample or None) of one line."""
    where = f"{path}:{line_no}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or "id" not in row or "completion" not in row:
        raise ValueError(f"{where}: expected a JSON object with 'id' and 'completion'")
    pid, completion, sample = row["id"], row["completion"], row.get("sample")
    if isinstance(pid, bool) or not isinstance(pid, str | int):
        raise ValueError(f"{where}: 'id' must be text, got {json.dumps(pid)}")
    if not isinstance(completion, str):
        raise ValueError(f"{where}: 'completion' must be text, got {json.dumps(completion)[:60]}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)):
        raise ValueError(f"{where}: 'sample' must be an integer >= 0, got {json.dumps(sample)}")
    if sample is not None and sample < 0:
        raise ValueError(f"{where}: 'sample' must be an integer >= 0, got {sample}")
    return str(pid), completion, sample


def read_completions(path: Path, problem_ids: list[str], limit: int | None = None) -> Completions:
    """The completions in `path` for problems `problem_ids` (see the module docstring)."""
    path = Path(path)
    known = set(problem_ids)
    rows = [(line_no, *_row(path, line_no, text)) for line_no, text in _lines(path)]
    if not rows:
        raise ValueError(f"{path}: no completions")
    unknown = [(line_no, pid) for line_no, pid, _, _ in rows if pid not in known]
    if unknown:
        shown = ", ".join(f"line {n}: {pid!r}" for n, pid in unknown[:EXAMPLES])
        more = ", ..." if len(unknown) > EXAMPLES else ""
        scope = f"the first {limit} problems (--limit)" if limit is not None else "the benchmark"
        raise ValueError(
            f"{path}: {len(unknown)} of {len(rows)} rows name ids that are not in {scope}: "
            f"{shown}{more}; its ids look like {problem_ids[0]!r}"
        )
    with_sample = [line_no for line_no, *_, sample in rows if sample is not None]
    if with_sample and len(with_sample) != len(rows):
        without = next(line_no for line_no, *_, sample in rows if sample is None)
        raise ValueError(
            f"{path}:{without}: no 'sample', but line {with_sample[0]} has one: give 'sample' "
            "on every row or on none"
        )
    items: list[tuple[str, int, str]] = []
    warnings: list[str] = []
    if with_sample:
        first_line: dict[tuple[str, int], int] = {}
        for line_no, pid, completion, sample in rows:
            if (pid, sample) in first_line:
                raise ValueError(
                    f"{path}:{line_no}: id {pid!r} sample {sample} again (first at line "
                    f"{first_line[pid, sample]}); each (id, sample) may appear once"
                )
            first_line[pid, sample] = line_no
            items.append((pid, sample, completion))
    else:
        count: dict[str, int] = {}
        seen: dict[tuple[str, str], int] = {}
        repeats: list[str] = []
        for line_no, pid, completion, _ in rows:
            if (pid, completion) in seen:
                repeats.append(f"line {line_no} repeats line {seen[pid, completion]}")
            seen.setdefault((pid, completion), line_no)
            count[pid] = count.get(pid, 0) + 1
            items.append((pid, count[pid] - 1, completion))
        if repeats:
            more = ", ..." if len(repeats) > EXAMPLES else ""
            warnings.append(
                f"{path}: {len(repeats)} rows repeat an earlier row exactly (same id and "
                f"completion; {', '.join(repeats[:EXAMPLES])}{more}); each counts as a sample"
            )
    per_problem: dict[str, int] = {}
    for pid, _, _ in items:
        per_problem[pid] = per_problem.get(pid, 0) + 1
    low, high = min(per_problem.values()), max(per_problem.values())
    if low != high:
        warnings.append(
            f"{path}: samples per problem vary from {low} to {high}; pass@k is reported for "
            f"k <= {low} only"
        )
    return Completions(items, warnings)
