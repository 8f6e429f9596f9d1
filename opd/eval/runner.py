"""Benchmark evaluation: prompt, generate (vLLM), grade, and summarize.

The same pieces serve `opd eval` (a model folder, vLLM in this process) and evaluation during
training (the rollout workers, holding the current policy). Math is graded by answer
extraction + `math-verify`; code by running the benchmark's tests in the sandbox.
"""

from __future__ import annotations

import json
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


def write_report(out: Path, summary: dict, graded: list[Graded]) -> Path:
    """The summary JSON at `out`, per-sample records in `<out stem>.records.jsonl` beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records = out.with_name(out.stem + ".records.jsonl")
    with records.open("w") as f:
        for g in graded:
            f.write(json.dumps(asdict(g)) + "\n")
    summary = {**summary, "records": str(records)}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return out


def read_completions(path: Path, known_ids: set[str]) -> list[tuple[str, int, str]]:
    """(id, sample, completion) from a jsonl of {"id", "completion"}; unknown ids are errors."""
    items, seen = [], {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pid, text = row["id"], row["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{line_no}: expected a JSON object with 'id' and 'completion' ({e})"
            ) from e
        if pid not in known_ids:
            raise ValueError(f"{path}:{line_no}: id {pid!r} is not a problem of this benchmark")
        seen[pid] = seen.get(pid, -1) + 1
        items.append((pid, seen[pid], str(text)))
    if not items:
        raise ValueError(f"{path}: no completions")
    return items


def evaluate(
    benchmark: str,
    settings: EvalSettings,
    generate_fn: Callable[[list, EvalSettings], list[tuple[str, int, str, int]]] | None = None,
    completions_file: Path | None = None,
    field_map: dict[str, str] | None = None,
) -> tuple[dict, list[Graded]]:
    """Generate with `generate_fn(problems, settings)` (or read `completions_file`) and grade."""
    from opd.eval.benchmarks import load_benchmark

    problems = load_benchmark(benchmark, limit=settings.limit, field_map=field_map)
    by_id = {p.id: p for p in problems}
    t0 = time.perf_counter()
    if completions_file is not None:
        items = read_completions(completions_file, set(by_id))
        tokens = 0
    else:
        generated = generate_fn(problems, settings)
        items = [(pid, s, text) for pid, s, text, _ in generated]
        tokens = sum(n for *_, n in generated)
    t1 = time.perf_counter()
    graded = grade_all(by_id, items)
    t2 = time.perf_counter()
    summary = summarize(graded, math=not is_code(problems[0]))
    summary.update({"benchmark": benchmark, "generation_s": t1 - t0, "grading_s": t2 - t1})
    if tokens:
        summary["generated_tokens"] = tokens
        summary["tokens_per_s"] = tokens / (t1 - t0)
    return summary, graded
