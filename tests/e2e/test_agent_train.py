"""Training on tool-calling trajectories (issue #19) with real vLLM + Ray + DeepSpeed, the tiny
models and the real sandbox: the sod and OPD-on-tools recipes run, every trajectory calls
the python tool (a first-turn regex makes the tiny student open with one), the model answers
after the tool turn, and a sod run stopped and re-run logs the uninterrupted run's metrics,
trajectories, rewards and step weights included. gkd trains on trajectories too."""

from pathlib import Path

import pytest
from e2e_runs import short_run, stable

pytestmark = pytest.mark.e2e

RECIPES = Path(__file__).parents[2] / "recipes"
STEPS = 4


def _run(recipe: str, out, *extra):
    return short_run(RECIPES / recipe, out, STEPS, "rollout.max_new_tokens=48", *extra)


@pytest.fixture(scope="module")
def sod_rows(ray_session, tmp_path_factory):
    return _run("sod/tiny.yaml", tmp_path_factory.mktemp("sod"))


def _check_trajectories(rows, n=STEPS):
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == n
    for r in steps:
        assert r["agent/tool_call_rate"] == 1.0  # every trajectory opened with a python block
        assert r["agent/tool_calls"] >= 1.0
        # the tool turn's tokens are out of the loss: fewer counted than generated
        assert 0 < r["agent/model_tokens"] < r["rollout/completion_tokens"]
        assert r["train/skipped_steps"] == 0
    return steps


def test_sod_trains_on_tool_trajectories(sod_rows):
    steps = _check_trajectories(sod_rows)
    for r in steps:
        assert r["reward/count"] == 16 and r["reward/errors"] == 0
        assert 0 < r["sod/step_weight"] <= 1.2 + 1e-6  # token mean of weights capped at 1 + delta
        assert r["sod/later_step_tokens"] > 0  # the model wrote a step after the tool turn
    assert any(r["sod/teacher_advantage"] != 0 for r in steps)


def test_sod_stopped_and_resumed_matches_the_uninterrupted_run(sod_rows, tmp_path):
    _run("sod/tiny.yaml", tmp_path, f"trainer.steps={STEPS // 2}")
    rows = _run("sod/tiny.yaml", tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert stable(rows) == stable(sod_rows)


def test_opd_trains_on_tool_trajectories(ray_session, tmp_path):
    """Also: eval.at_start=false evaluates every N steps but not before the first."""
    evals = ["eval.every=2", "eval.at_start=false"]
    rows = _run("reverse_kl/tiny-tools.yaml", tmp_path, *evals)
    steps = _check_trajectories(rows)
    assert all(r["reverse_kl/analytic_kl"] >= 0 for r in steps)
    assert rows[0]["step"] == 1
    assert [r["step"] for r in rows if "heldout/reverse_kl" in r] == [2, 4]


def test_gkd_trains_on_tool_trajectories(ray_session, tmp_path):
    gkd = ["objective.name=gkd", "objective.params={beta: 0.5, lmbda: 1.0}", "trainer.steps=2"]
    steps = _check_trajectories(_run("reverse_kl/tiny-tools.yaml", tmp_path, *gkd), n=2)
    assert all(r["train/loss"] >= 0 for r in steps)
