"""Rewards in the loop (issue #18), with real vLLM + Ray + DeepSpeed on the tiny models and the
real math grader: the grpo, trrd and reward-mixed reverse_kl recipes run and log `reward/*`;
each, stopped and re-run, logs the uninterrupted run's metrics, rewards and groups included;
trrd with alpha = 1 trains exactly as grpo does.
"""

from pathlib import Path

import pytest
from e2e_runs import short_run, stable, train_rows

pytestmark = pytest.mark.e2e

RECIPES = Path(__file__).parents[2] / "recipes"
STEPS = 4
REWARD_KEYS = {
    "reward/mean",
    "reward/pass_rate",
    "reward/timeouts",
    "reward/errors",
    "reward/count",
    "reward/groups",
    "reward/all_equal_groups",
    "reward/group_std",
}


def _run(recipe: str, out, *extra):
    return short_run(RECIPES / recipe, out, STEPS, *extra)


@pytest.fixture(scope="module")
def grpo_rows(ray_session, tmp_path_factory):
    return _run("grpo/tiny.yaml", tmp_path_factory.mktemp("grpo"))


def _check_rewards(rows):
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == STEPS
    for r in steps:
        assert REWARD_KEYS <= r.keys(), r
        assert r["reward/count"] == 16 and r["reward/groups"] == 4  # 4 prompts x 4 samples
        assert r["reward/timeouts"] == 0 and r["reward/errors"] == 0
        assert 0 <= r["reward/mean"] <= 1
    return steps


def test_grpo_learns_from_graded_groups(grpo_rows):
    steps = _check_rewards(grpo_rows)
    # the trained tiny model solves some problems of each group and misses others: the
    # groups' rewards differ, so advantages are nonzero and the loss moves the policy
    assert any(0 < r["reward/mean"] < 1 and r["reward/group_std"] > 0 for r in steps)
    assert any(r["grpo/abs_advantage"] > 0 for r in steps)
    assert all(r["train/skipped_steps"] == 0 and r["train/grad_norm"] >= 0 for r in steps)


def test_grpo_stopped_and_resumed_matches_the_uninterrupted_run(grpo_rows, tmp_path):
    _run("grpo/tiny.yaml", tmp_path, f"trainer.steps={STEPS // 2}")
    rows = _run("grpo/tiny.yaml", tmp_path)  # the same command with the full step count
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert stable(rows) == stable(grpo_rows)


def test_trrd_with_alpha_1_trains_exactly_as_grpo(grpo_rows, tmp_path):
    rows = _run("trrd/tiny.yaml", tmp_path, "objective.params.alpha=1.0")
    for a, b in zip(rows, grpo_rows, strict=True):
        assert a["train/loss"] == b["train/loss"]
        assert {k: a[k] for k in REWARD_KEYS} == {k: b[k] for k in REWARD_KEYS}


@pytest.fixture(scope="module")
def trrd_rows(ray_session, tmp_path_factory):
    return _run("trrd/tiny.yaml", tmp_path_factory.mktemp("trrd"))


@pytest.fixture(scope="module")
def mixed_rows(ray_session, tmp_path_factory):
    return _run("reverse_kl/tiny-reward.yaml", tmp_path_factory.mktemp("mixed"))


def test_trrd_and_reward_mixed_reverse_kl_recipes_run(trrd_rows, mixed_rows):
    trrd = _check_rewards(trrd_rows)
    assert all("trrd/clip_frac" in r for r in trrd)
    mixed = _check_rewards(mixed_rows)
    assert all("reverse_kl/sampled_kl" in r for r in mixed)


@pytest.mark.parametrize("which", ["trrd", "mixed"])
def test_trrd_and_mixed_stopped_and_resumed_match_the_uninterrupted_runs(
    which, trrd_rows, mixed_rows, tmp_path
):
    recipe, full = {
        "trrd": ("trrd/tiny.yaml", trrd_rows),
        "mixed": ("reverse_kl/tiny-reward.yaml", mixed_rows),
    }[which]
    _run(recipe, tmp_path, f"trainer.steps={STEPS // 2}")
    rows = _run(recipe, tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert stable(rows) == stable(full)


@pytest.mark.slow
def test_smollm2_reward_recipes_run_one_step(ray_session, tmp_path):
    """The real-weights recipes of the reward comparison, one small step each, chained as a
    user runs them: the SFT teacher recipe exports its student, which the grpo, trrd and
    reverse_kl (plain and reward-mixed) recipes take as their teacher; the generated
    arithmetic problems, math_correct on real completions, the groups."""
    import math
    import shutil

    small = [
        "trainer.steps=1",
        "eval.every=0",
        "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=16",
        "learner.micro_batch_size=2",
        "run.progress=false",
        "cluster.timeout_s=900",
    ]
    teacher_run = tmp_path / "sft"
    (row,) = train_rows(
        RECIPES / "sft/smollm2-135m-arith.yaml", [f"run.output_dir={teacher_run}", *small]
    )
    assert row["step"] == 1 and math.isfinite(row["train/loss"])
    shutil.rmtree(teacher_run / "checkpoints")
    teacher = [f"teacher.path={teacher_run / 'student'}", "checkpoint.export_student=false"]
    for recipe in (
        "grpo/smollm2-135m-arith.yaml",
        "trrd/smollm2-135m-arith.yaml",
        "reverse_kl/smollm2-135m-arith-reward.yaml",
        "reverse_kl/smollm2-135m-arith.yaml",
    ):
        out = tmp_path / recipe.replace("/", "_")
        overrides = [f"run.output_dir={out}", *small, *teacher, "rollout.samples_per_prompt=2"]
        (row,) = train_rows(RECIPES / recipe, overrides)
        assert row["step"] == 1 and row["train/skipped_steps"] == 0, recipe
        assert math.isfinite(row["train/loss"]), recipe
        assert row["reward/count"] == 4 and row["reward/groups"] == 2, recipe
        assert row["reward/errors"] == 0 and row["reward/timeouts"] == 0, recipe
        shutil.rmtree(out / "checkpoints")  # 135M parameters with their optimizer state
