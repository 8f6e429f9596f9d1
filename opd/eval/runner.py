"""Benchmark evaluation: prompt, generate (vLLM), grade, and summarize.

The same pieces serve `opd eval` (a model folder, vLLM in this process) and evaluation during
training (the rollout workers, holding the current policy). Math is graded by answer
extraction + `math-verify`; code by running the benchmark's tests in the sandbox.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function in a ```python "
    "code block.\n\n```python\n{prefix}```"
)


@dataclass
class EvalSettings:
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    limit: int | None = None
    seed: int = 0


@dataclass
class Graded:
    id: str
    sample: int
    completion: str
    correct: bool
    answer: str | None  # the extracted final answer (math), None for code


def is_code(problem) -> bool:
    return bool(getattr(problem, "entry_point", None))


def problem_messages(problem) -> list[dict[str, str]]:
    if is_code(problem):
        content = CODE_TEMPLATE.format(prefix=problem.prefix or problem.prompt)
    else:
        content = problem.prompt + MATH_SUFFIX
    return [{"role": "user", "content": content}]


def grade_one(problem, completion: str, sample: int) -> Graded:
    if is_code(problem):
        from opd.rewards.code import code_reward

        ok = code_reward(problem, completion) == 1.0
        return Graded(problem.id, sample, completion, ok, None)
    from opd.rewards.math import extract_answer, math_equal

    answer = extract_answer(completion)
    ok = answer is not None and math_equal(answer, problem.answer)
    return Graded(problem.id, sample, completion, ok, answer)


def grade_all(
    problems_by_id: dict, completions: list[tuple[str, int, str]], workers: int = 2
) -> list[Graded]:
    """Grade (id, sample, completion) triples; code runs in parallel sandboxes."""

    def task(item):
        pid, sample, text = item
        return grade_one(problems_by_id[pid], text, sample)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(task, completions))


def summarize(graded: list[Graded], math: bool) -> dict:
    """pass@1 (mean over samples), unbiased pass@k for k <= n, maj@n for math."""
    from opd.eval.passk import majority_at_n, pass_at_k

    by_problem: dict[str, list[Graded]] = {}
    for g in graded:
        by_problem.setdefault(g.id, []).append(g)
    n = min(len(v) for v in by_problem.values())
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})
    summary: dict = {"n_problems": len(by_problem), "samples_per_problem": n}
    for k in ks:
        summary[f"pass@{k}"] = sum(
            pass_at_k(len(v), sum(g.correct for g in v), k) for v in by_problem.values()
        ) / len(by_problem)
    if math and n > 1:
        summary[f"maj@{n}"] = sum(
            majority_at_n([g.answer for g in v], [g.correct for g in v])
            for v in by_problem.values()
        ) / len(by_problem)
    return summary


def records_path(out: Path) -> Path:
    return out.with_name(out.stem + ".records.jsonl")


def check_outputs(out: Path, overwrite: bool = False) -> None:
    """Before any work: `out` and its records file can be written, and replace nothing unless
    `overwrite`. Creates `out`'s folder. Errors are ValueErrors naming the path."""
    outputs = (out, records_path(out))
    for path in outputs:
        if path.is_dir():
            raise ValueError(f"--out {out}: {path} is a folder; give a file name (e.g. eval.json)")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--out {out}: {' and '.join(existing)} already exist; pass --overwrite to replace "
            "them, or choose another --out"
        )
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e})") from e


def write_report(out: Path, summary: dict, graded: list[Graded]) -> Path:
    """The summary JSON at `out`, per-sample records in `<out stem>.records.jsonl` beside it,
    each written to a temporary file and renamed into place (never left half-written)."""
    from opd.cache import atomic_write_bytes

    records = records_path(out)
    lines = "".join(json.dumps(asdict(g)) + "\n" for g in graded)
    atomic_write_bytes(records, lines.encode())
    summary = {**summary, "records": str(records)}
    atomic_write_bytes(out, (json.dumps(summary, indent=2) + "\n").encode())
    return out


def load_problems(benchmark: str, limit: int | None, field_map: dict[str, str] | None) -> list:
    """The benchmark's problems (the first `limit`); an empty list is an error."""
    from opd.eval.benchmarks import load_benchmark

    problems = load_benchmark(benchmark, limit=limit, field_map=field_map)
    if not problems:
        raise ValueError(f"benchmark {benchmark}: no problems")
    return problems


def evaluate(
    benchmark: str,
    problems: list,
    settings: EvalSettings,
    generate_fn: Callable[[list, EvalSettings], list[tuple[str, int, str, int]]] | None = None,
    items: list[tuple[str, int, str]] | None = None,
) -> tuple[dict, list[Graded]]:
    """Grade `items` (id, sample, completion), or what `generate_fn(problems, settings)` makes.

    The summary's `coverage` counts the problems graded out of the benchmark's (`problems`)."""
    by_id = {p.id: p for p in problems}
    t0 = time.perf_counter()
    tokens = 0
    if items is None:
        generated = generate_fn(problems, settings)
        items = [(pid, s, text) for pid, s, text, _ in generated]
        tokens = sum(n for *_, n in generated)
    t1 = time.perf_counter()
    graded = grade_all(by_id, items)
    t2 = time.perf_counter()
    summary = summarize(graded, math=not is_code(problems[0]))
    summary.update(
        {
            "benchmark": benchmark,
            "benchmark_problems": len(problems),
            "coverage": f"{summary['n_problems']}/{len(problems)} problems",
            "generation_s": t1 - t0,
            "grading_s": t2 - t1,
        }
    )
    if tokens:
        summary["generated_tokens"] = tokens
        summary["tokens_per_s"] = tokens / (t1 - t0)
    return summary, graded
