"""Rewards by name: `(record, completion) -> float`, where a record is a Problem or a row dict.

- `math_correct`: 1.0 if the completion's final answer (`extract_answer`) equals the record's
  `answer` (`math_equal`), else 0.0.
- `code_tests_passed`: `opd.rewards.code.code_reward`, imported on first call, so this module
  works before (and without) that file.

`register_reward` adds more. `call_with_timeout` bounds any reward's wall time; see its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opd.rewards.math import extract_answer, final_answer, math_equal, run_with_deadline

RewardFn = Callable[[Any, str], float]


def record_field(record: Any, name: str) -> Any:
    """`record[name]` for a dict, `record.name` for a Problem (or any object); None if absent."""
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def math_correct(record: Any, completion: str) -> float:
    """1.0 if the completion's final answer matches the record's reference answer. A worked
    solution as the reference (GSM8K's `#### 42`, "the answer is 42", a `\\boxed{}`) counts
    by its final answer; any other reference is the answer itself (`\\frac{1}{2}` is not
    reduced to its last number)."""
    ref = record_field(record, "answer")
    if ref is None or str(ref).strip() == "":
        raise ValueError(f"math_correct needs a reference 'answer'; record: {_describe(record)}")
    return float(math_equal(extract_answer(completion), final_answer(str(ref))))


def code_tests_passed(record: Any, completion: str) -> float:
    """Share (or 0/1) of the record's tests the completion passes: `opd.rewards.code`."""
    try:
        from opd.rewards.code import code_reward
    except ImportError as err:
        raise ImportError(
            "reward 'code_tests_passed' needs opd/rewards/code.py with "
            f"code_reward(record, completion) -> float ({err})"
        ) from err
    return float(code_reward(record, completion))


REWARDS: dict[str, RewardFn] = {
    "math_correct": math_correct,
    "code_tests_passed": code_tests_passed,
}


def register_reward(name: str, fn: RewardFn, *, replace: bool = False) -> RewardFn:
    """Add `fn` under `name`; an existing name needs `replace=True`."""
    if name in REWARDS and not replace:
        raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    return fn


def get_reward(name: str) -> RewardFn:
    """The reward called `name`; an unknown name lists the known ones."""
    try:
        return REWARDS[name]
    except KeyError:
        known = ", ".join(sorted(REWARDS))
        raise ValueError(f"unknown reward {name!r}; known rewards: {known}") from None


def call_with_timeout(fn: RewardFn, record: Any, completion: str, timeout_s: float) -> float:
    """`fn(record, completion)`, or 0.0 if it has not returned after `timeout_s` seconds.

    It runs in a daemon thread (cheap, and unlike `signal.alarm` usable from any thread). On a
    timeout that thread is sent an asynchronous exception, which stops Python code at its next
    bytecode but not a long C call; rewards that run untrusted code (code tests) must still
    bound that work in a subprocess of their own. Exceptions raised by `fn` propagate.
    """
    done, value = run_with_deadline(fn, (record, completion), timeout_s)
    return float(value) if done else 0.0


def _describe(record: Any) -> str:
    rid = record_field(record, "id")
    return repr(rid) if rid is not None else type(record).__name__
