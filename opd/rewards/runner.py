"""Score a batch of completions with one reward, in parallel, each call bounded by a timeout.

The reward comes from a recipe's `rewards:` block (`RewardConfig`):

```yaml
rewards:
  name: math_correct          # a registered reward (opd.rewards.registry): math_correct,
                              # code_tests_passed; or instead:
  # import_path: mypkg.rewards:my_reward   # a user function (record, completion) -> float
  timeout_s: 30.0             # per call, from when the call starts on a worker
  workers: 4                  # calls in flight at once
  failure_value: 0.0          # the reward of a call that timed out or raised
  pass_threshold: 1.0         # a reward >= this counts as a pass (reward/pass_rate)
  isolation: process          # process (killable child processes) or thread
  advantage_scale: std        # how rewards become advantages: std (GRPO) or none (Dr. GRPO)
  advantage_eps: 1.0e-6       # added to the group std
```

Set `name` or `import_path`, not both; with neither, the block is off (`enabled` is False).
The runner does not read the last two: they are the arguments of
`opd.objectives.advantages.group_advantages`, kept here so that a recipe's rewards live in one
block.

`RewardRunner(cfg).score(records, completions)` returns a `RewardBatch`: one reward per
completion in input order, a status per completion (`ok`, `timeout`, `error`) and
`RewardStats`. A call that times out or raises, or returns something that is not a finite
number, is logged as one warning naming the record's id, counted, and given `failure_value`;
it never fails the batch.

Isolation (`opd.rewards.worker` says exactly what each can stop): `process`, the default,
runs the reward in `workers` spawned child processes and kills a child whose call runs past
`timeout_s`, so that even a reward stuck in a C call comes back on time; the reward must be a
module-level function. `thread` runs calls in threads of this process: cheaper to start and
fine for any callable, but a timed-out call that holds the GIL in C stalls the caller.

`records` are whatever the reward reads: dicts or objects with the fields the reward needs
(`answer` for math_correct; `tests`/`test`, `prompt`/`prefix` and `entry_point` for
code_tests_passed). A runner owns child processes: build it where it is used (inside the Ray
actor, not on the driver), and `close()` it or use it as a context manager.
"""

from __future__ import annotations

import logging
import math
import queue
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from opd.imports import import_attr, split_import_path
from opd.rewards.registry import REWARDS, RewardFn, get_reward, record_field
from opd.rewards.worker import ProcessCaller, ThreadCaller

ISOLATIONS = ("process", "thread")
ADVANTAGE_SCALES = ("std", "none")  # opd.objectives.advantages.SCALES, without importing torch
STATUSES = ("ok", "timeout", "error")

_log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    """The `rewards:` block of a recipe (see the module docstring)."""

    name: str | None = None  # a registered reward: math_correct, code_tests_passed, ...
    import_path: str | None = None  # "pkg.mod:fn", a user reward (record, completion) -> float
    timeout_s: float = 30.0  # per completion; a reward past it gets failure_value and is counted
    workers: int = 4  # rewards computed at once
    failure_value: float = 0.0  # the reward of a completion whose reward timed out or raised
    pass_threshold: float = 1.0  # reward/pass_rate counts rewards at or above this
    isolation: str = "process"  # process (a killable child per worker) or thread
    advantage_scale: str = "std"  # group_advantages(scale=...): std or none
    advantage_eps: float = 1e-6  # group_advantages(eps=...)

    def __post_init__(self) -> None:
        if self.name and self.import_path:
            raise ValueError(
                f"rewards.name={self.name!r} and rewards.import_path={self.import_path!r}: "
                "set one of them, not both"
            )
        if self.import_path is not None:
            split_import_path(self.import_path, "rewards.import_path", "pkg.mod:fn")
        if not self.timeout_s > 0:
            raise ValueError(f"rewards.timeout_s={self.timeout_s} must be > 0")
        if self.workers < 1:
            raise ValueError(f"rewards.workers={self.workers} must be >= 1")
        if not math.isfinite(self.failure_value):
            raise ValueError(f"rewards.failure_value={self.failure_value} must be finite")
        if not math.isfinite(self.pass_threshold):
            raise ValueError(f"rewards.pass_threshold={self.pass_threshold} must be finite")
        if self.isolation not in ISOLATIONS:
            raise ValueError(
                f"rewards.isolation={self.isolation!r}; valid: {', '.join(ISOLATIONS)}"
            )
        if self.advantage_scale not in ADVANTAGE_SCALES:
            valid = ", ".join(ADVANTAGE_SCALES)
            raise ValueError(f"rewards.advantage_scale={self.advantage_scale!r}; valid: {valid}")
        if not self.advantage_eps >= 0:
            raise ValueError(f"rewards.advantage_eps={self.advantage_eps} must be >= 0")

    @property
    def enabled(self) -> bool:
        """Whether a reward is set at all."""
        return bool(self.name or self.import_path)


def resolve_reward(cfg: RewardConfig) -> RewardFn:
    """The function `cfg` names; a ValueError naming the key if there is none."""
    if cfg.import_path:
        fn = import_attr(cfg.import_path, "rewards.import_path", "pkg.mod:fn")
        if not callable(fn):
            raise ValueError(f"rewards.import_path={cfg.import_path!r} is not callable")
        return fn
    known = ", ".join(sorted(REWARDS))
    if not cfg.name:
        raise ValueError(
            f"no reward is set: set rewards.name (one of {known}) or rewards.import_path "
            "('pkg.mod:fn')"
        )
    try:
        return get_reward(cfg.name)
    except ValueError:
        raise ValueError(f"rewards.name={cfg.name!r} is unknown; valid: {known}") from None


@dataclass
class RewardStats:
    """A batch's rewards in numbers. `mean` is over every reward, failure values included (it
    is what the advantages see); `pass_rate` is the fraction of rewards >= the config's
    `pass_threshold`. An empty batch has mean and pass rate 0."""

    count: int
    mean: float
    pass_rate: float
    timeouts: int
    errors: int

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """`{prefix}/mean`, `{prefix}/pass_rate`, `{prefix}/timeouts`, `{prefix}/errors`,
        `{prefix}/count`."""
        return {
            f"{prefix}/mean": self.mean,
            f"{prefix}/pass_rate": self.pass_rate,
            f"{prefix}/timeouts": float(self.timeouts),
            f"{prefix}/errors": float(self.errors),
            f"{prefix}/count": float(self.count),
        }


@dataclass
class RewardBatch:
    rewards: list[float]  # one per completion, in input order
    status: list[str]  # ok, timeout or error, in input order
    stats: RewardStats


def reward_stats(rewards: Sequence[float], status: Sequence[str], pass_threshold: float):
    n = len(rewards)
    return RewardStats(
        count=n,
        mean=sum(rewards) / n if n else 0.0,
        pass_rate=sum(r >= pass_threshold for r in rewards) / n if n else 0.0,
        timeouts=sum(s == "timeout" for s in status),
        errors=sum(s == "error" for s in status),
    )


class RewardRunner:
    """Scores batches with the reward of a `RewardConfig`; holds its workers until `close()`."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.label = cfg.name or cfg.import_path
        fn = resolve_reward(cfg)
        self._callers: queue.SimpleQueue = queue.SimpleQueue()
        self._all = [
            ProcessCaller(fn) if cfg.isolation == "process" else ThreadCaller(fn)
            for _ in range(cfg.workers)
        ]
        for caller in self._all:
            self._callers.put(caller)
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="opd-reward")

    def score(self, records: Sequence[Any], completions: Sequence[str]) -> RewardBatch:
        """Reward each (record, completion) pair; see the module docstring."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        outcomes = list(self._pool.map(self._score_one, records, completions))
        rewards = [value for _, value in outcomes]
        status = [s for s, _ in outcomes]
        return RewardBatch(rewards, status, reward_stats(rewards, status, self.cfg.pass_threshold))

    def _score_one(self, record: Any, completion: str) -> tuple[str, float]:
        caller = self._callers.get()
        try:
            status, value = caller.call(record, completion, self.cfg.timeout_s)
        finally:
            self._callers.put(caller)
        if status == "ok":
            try:
                value = float(value)
            except (TypeError, ValueError):
                status, value = "error", f"returned {value!r}, not a number"
            else:
                if not math.isfinite(value):
                    status, value = "error", f"returned {value}"
        if status == "ok":
            return status, value
        _log.warning(
            "reward %s: record %s: %s (%s; scored %g)",
            self.label,
            _record_id(record),
            status,
            value,
            self.cfg.failure_value,
        )
        return status, self.cfg.failure_value

    def close(self) -> None:
        """Stop the threads and kill the child processes."""
        self._pool.shutdown(wait=True)
        for caller in self._all:
            caller.stop()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record_id(record: Any) -> str:
    rid = record_field(record, "id")
    return repr(rid) if rid is not None else f"<{type(record).__name__} without id>"
