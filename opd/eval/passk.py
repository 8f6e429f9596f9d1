"""pass@k (the unbiased estimator of Chen et al. 2021) and majority voting (maj@n).

pass@k for one problem with n samples of which c are correct is the chance that a k-subset drawn
without replacement from the n holds at least one correct sample: 1 - C(n-c, k) / C(n, k).
The binomials overflow floats for large n, so we use the product form
C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from opd.rewards.math import normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: `n` samples, `c` of them correct, `1 <= k <= n`."""
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as `(n, c)` pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems to average")
    return sum(values) / len(values)


def pass_at_k_by_benchmark(
    results: Iterable[tuple[str, int, int]], ks: Sequence[int]
) -> dict[str, dict[int, float]]:
    """`{benchmark: {k: mean pass@k}}` from `(benchmark, n, c)` rows, one row per problem.

    A k larger than some problem's n is left out for that benchmark (it has no unbiased value).
    """
    grouped: dict[str, list[tuple[int, int]]] = {}
    for bench, n, c in results:
        grouped.setdefault(bench, []).append((n, c))
    out: dict[str, dict[int, float]] = {}
    for bench, counts in grouped.items():
        smallest = min(n for n, _ in counts)
        out[bench] = {k: mean_pass_at_k(counts, k) for k in ks if k <= smallest}
    return out


def _vote(
    answers: Sequence[str | None], equiv_fn: Callable[[str, str], bool] | None
) -> tuple[int | None, int]:
    """(index of the winning group's first answer, its votes); (None, 0) if all abstain."""
    groups: list[list] = []  # [index of first member, normalised key, votes]
    for i, ans in enumerate(answers):
        if ans is None or not str(ans).strip():
            continue
        key = normalize_answer(str(ans))
        for group in groups:
            first = str(answers[group[0]])
            if group[1] == key or (equiv_fn is not None and equiv_fn(str(ans), first)):
                group[2] += 1
                break
        else:
            groups.append([i, key, 1])
    if not groups:
        return None, 0
    best = max(groups, key=lambda g: g[2])  # max keeps the first of equals
    return best[0], best[2]


def majority_vote(
    answers: Sequence[str | None],
    equiv_fn: Callable[[str, str], bool] | None = None,
) -> tuple[str | None, int]:
    """The most common answer and its vote count; None (or blank) answers abstain.

    Answers are grouped by `normalize_answer`, and, when `equiv_fn` is given (e.g. `math_equal`),
    also by equivalence with each group's first member. Ties go to the group seen first.
    """
    index, votes = _vote(answers, equiv_fn)
    return (None, 0) if index is None else (str(answers[index]), votes)


def majority_at_n(
    answers: Sequence[str | None],
    correct_fn: Callable[[str], bool] | Sequence[bool],
    equiv_fn: Callable[[str, str], bool] | None = None,
) -> float:
    """maj@n of one problem: 1.0 if the majority answer of the n samples is correct, else 0.0.

    `correct_fn` is either a function grading an answer, or the per-sample correctness already
    computed (aligned with `answers`); then the winning group's first sample decides.
    """
    index, _ = _vote(answers, equiv_fn)
    if index is None:
        return 0.0
    if callable(correct_fn):
        return float(bool(correct_fn(str(answers[index]))))
    if len(correct_fn) != len(answers):
        raise ValueError(f"{len(correct_fn)} correctness flags for {len(answers)} answers")
    return float(bool(correct_fn[index]))
