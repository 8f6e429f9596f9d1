"""The reward runner: real graders and sandbox, user rewards by import path, timeouts, errors."""

from __future__ import annotations

import logging
import sys
import textwrap
import time
import uuid

import pytest
from omegaconf import OmegaConf

from opd.objectives.advantages import SCALES
from opd.rewards.registry import REWARDS, register_reward
from opd.rewards.runner import (
    ADVANTAGE_SCALES,
    RewardConfig,
    RewardRunner,
    resolve_reward,
    reward_stats,
)

USER_REWARDS = """
import random
import time


def length(record, completion):
    time.sleep(random.random() * 0.05)  # finish out of order
    return float(len(completion))


def moody(record, completion):
    if completion == "loop":
        while True:
            pass
    if completion == "sleep":
        time.sleep(60)
    if completion == "gil":  # one C call that holds the GIL for minutes
        return float(pow(3, 10**8) % 7)
    if completion == "raise":
        raise RuntimeError("bad record " + str(record["id"]))
    if completion == "nan":
        return float("nan")
    if completion == "text":
        return "yes"
    return 1.0
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of user rewards on sys.path, under a fresh name (no stale import)."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _rows(n):
    return [{"id": f"r{i}"} for i in range(n)]


def test_math_correct_right_wrong_unparseable_and_missing_answer(caplog):
    records = [{"id": f"m{i}", "answer": "\\frac{1}{2}"} for i in range(3)] + [{"id": "m3"}]
    completions = [
        "so the answer is \\boxed{0.5}",
        "so the answer is \\boxed{0.6}",
        "I cannot tell.",
        "\\boxed{1}",
    ]
    with caplog.at_level(logging.WARNING), RewardRunner(RewardConfig(name="math_correct")) as run:
        batch = run.score(records, completions)
    assert batch.rewards == [1.0, 0.0, 0.0, 0.0]
    assert batch.status == ["ok", "ok", "ok", "error"]
    s = batch.stats
    assert (s.count, s.mean, s.pass_rate, s.timeouts, s.errors) == (4, 0.25, 0.25, 0, 1)
    assert "'m3'" in caplog.text and "ValueError" in caplog.text


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
def test_code_tests_passed_runs_the_real_sandbox():
    record = {
        "id": "add",
        "prompt": "def add(a, b):\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }
    cfg = RewardConfig(name="code_tests_passed", workers=2)
    with RewardRunner(cfg) as run:
        batch = run.score([record, record], ["    return a + b\n", "    return a - b\n"])
    assert batch.rewards == [1.0, 0.0]
    assert batch.status == ["ok", "ok"]
    assert batch.stats.pass_rate == 0.5


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_user_reward_by_import_path_keeps_input_order(user_module, isolation):
    completions = ["x" * n for n in (5, 1, 7, 3, 0, 9, 2, 4)]
    cfg = RewardConfig(import_path=f"{user_module}:length", workers=3, isolation=isolation)
    with RewardRunner(cfg) as run:
        batch = run.score(_rows(len(completions)), completions)
        again = run.score(_rows(2), ["ab", "abc"])  # the workers are reused
    assert batch.rewards == [5.0, 1.0, 7.0, 3.0, 0.0, 9.0, 2.0, 4.0]
    assert batch.status == ["ok"] * len(completions)
    assert again.rewards == [2.0, 3.0]


def test_hanging_rewards_come_back_by_the_timeout_in_processes(user_module, caplog):
    """A pure-Python loop, a blocking sleep and a GIL-holding C call are all killed on time,
    and the batch's other items are scored."""
    completions = ["ok", "loop", "sleep", "gil", "ok"]
    cfg = RewardConfig(
        import_path=f"{user_module}:moody", timeout_s=2.0, workers=2, failure_value=-1.0
    )
    with caplog.at_level(logging.WARNING), RewardRunner(cfg) as run:
        run.score(_rows(2), ["ok", "ok"])  # start both children before timing
        t0 = time.perf_counter()
        batch = run.score(_rows(5), completions)
        elapsed = time.perf_counter() - t0
        after = run.score(_rows(2), ["ok", "ok"])  # killed children were replaced
    assert batch.rewards == [1.0, -1.0, -1.0, -1.0, 1.0]
    assert batch.status == ["ok", "timeout", "timeout", "timeout", "ok"]
    assert (batch.stats.timeouts, batch.stats.errors) == (3, 0)
    assert batch.stats.mean == pytest.approx(-0.2)
    assert elapsed < 15  # three 2 s timeouts on two workers, plus restarts; never 60 s
    assert after.rewards == [1.0, 1.0]
    assert "'r1'" in caplog.text and "timeout" in caplog.text


def test_hanging_rewards_come_back_by_the_timeout_in_threads(user_module):
    """Threads stop a pure-Python loop and abandon a sleep (a GIL-holding call they cannot
    bound: processes are for that)."""
    cfg = RewardConfig(
        import_path=f"{user_module}:moody", timeout_s=1.0, workers=2, isolation="thread"
    )
    t0 = time.perf_counter()
    with RewardRunner(cfg) as run:
        batch = run.score(_rows(3), ["loop", "sleep", "ok"])
    assert time.perf_counter() - t0 < 10
    assert batch.status == ["timeout", "timeout", "ok"]
    assert batch.rewards == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_raising_and_non_numbers_are_counted_errors(user_module, isolation, caplog):
    cfg = RewardConfig(import_path=f"{user_module}:moody", workers=2, isolation=isolation)
    with caplog.at_level(logging.WARNING), RewardRunner(cfg) as run:
        batch = run.score(_rows(4), ["raise", "ok", "nan", "text"])
    assert batch.status == ["error", "ok", "error", "error"]
    assert batch.rewards == [0.0, 1.0, 0.0, 0.0]
    assert (batch.stats.errors, batch.stats.timeouts, batch.stats.count) == (3, 0, 4)
    assert "RuntimeError: bad record r0" in caplog.text


def test_stats_pass_rate_threshold_and_empty_batch():
    s = reward_stats([0.0, 0.5, 0.75, 1.0], ["ok", "ok", "timeout", "error"], 0.5)
    assert (s.count, s.mean, s.pass_rate, s.timeouts, s.errors) == (4, 0.5625, 0.75, 1, 1)
    assert s.metrics()["reward/pass_rate"] == 0.75
    assert set(s.metrics("r")) == {"r/mean", "r/pass_rate", "r/timeouts", "r/errors", "r/count"}
    empty = reward_stats([], [], 1.0)
    assert (empty.count, empty.mean, empty.pass_rate) == (0, 0.0, 0.0)
    with RewardRunner(RewardConfig(name="math_correct", isolation="thread")) as run:
        assert run.score([], []).rewards == []
        with pytest.raises(ValueError, match="2 records but 1 completions"):
            run.score([{}, {}], [""])


def test_config_errors_name_the_key(user_module):
    bad = [
        ({"name": "math_correct", "import_path": "a:b"}, "rewards.name"),
        ({"import_path": "no_colon"}, "rewards.import_path"),
        ({"name": "math_correct", "timeout_s": 0}, r"rewards.timeout_s=0 must be > 0"),
        ({"name": "math_correct", "workers": 0}, "rewards.workers"),
        ({"name": "math_correct", "failure_value": float("nan")}, "rewards.failure_value"),
        ({"name": "math_correct", "isolation": "fork"}, "rewards.isolation"),
        ({"name": "math_correct", "advantage_scale": "mad"}, "rewards.advantage_scale"),
        ({"name": "math_correct", "advantage_eps": -1.0}, "rewards.advantage_eps"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            RewardConfig(**kwargs)
    assert not RewardConfig().enabled and RewardConfig(name="math_correct").enabled
    assert ADVANTAGE_SCALES == SCALES
    with pytest.raises(ValueError, match="rewards.name .*rewards.import_path"):
        resolve_reward(RewardConfig())
    with pytest.raises(ValueError, match="rewards.name='nope' is unknown; valid: .*math_correct"):
        resolve_reward(RewardConfig(name="nope"))
    with pytest.raises(ValueError, match="rewards.import_path='no_such_mod_x:f'"):
        resolve_reward(RewardConfig(import_path="no_such_mod_x:f"))
    with pytest.raises(ValueError, match=f"rewards.import_path='{user_module}:missing'"):
        resolve_reward(RewardConfig(import_path=f"{user_module}:missing"))


def test_a_lambda_needs_thread_isolation():
    register_reward("lambda_one", lambda record, completion: 1.0)
    try:
        with pytest.raises(ValueError, match="rewards.isolation=thread"):
            RewardRunner(RewardConfig(name="lambda_one"))
        with RewardRunner(RewardConfig(name="lambda_one", isolation="thread")) as run:
            assert run.score([{}], ["x"]).rewards == [1.0]
    finally:
        REWARDS.pop("lambda_one")


def test_config_loads_through_omegaconf_strictly():
    """The shape a recipe's `rewards:` block will be merged into."""
    schema = OmegaConf.structured(RewardConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, {"import_path": "m:f", "timeout_s": 5}))
    assert cfg == RewardConfig(import_path="m:f", timeout_s=5.0)
    with pytest.raises(Exception, match="timeout"):
        OmegaConf.merge(schema, {"timeuot_s": 5})
