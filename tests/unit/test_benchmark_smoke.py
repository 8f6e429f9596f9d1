"""The GPU benchmarks' tiny CPU variants run and print well-formed JSON lines.

The learner and teacher ones take well under 20 s on the 2-core CPU; the two that start Ray
(`ray_learners.py`, `train_layouts.py`: learner ranks as actors, and `opd train` itself) take
30-60 s and are checked for their numbers' consistency. The other vLLM ones
(`rollout_decode.py`, `opd_vs_trl.py`, `split_step.py --layout colocated`) are run by hand
(benchmarks/RESULTS.md says how).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, timeout: float = 120) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        env={**os.environ, "RAY_ADDRESS": "local"},  # a Ray of its own, never a test's
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    "script,args,expect",
    [
        (
            "learner_step.py",
            [
                "--size",
                "tiny",
                "--configs",
                "2x2",
                "--steps",
                "1",
                "--prompt",
                "8",
                "16",
                "--completion",
                "8",
                "16",
            ],  # fmt: skip
            {"seconds_per_step", "tokens_per_s", "packing"},
        ),
        (
            "teacher_scoring.py",
            ["--size", "tiny", "--samples", "2", "--budgets", "2048", "--steps", "1"],
            {"seconds", "tokens_per_s", "token_budget"},
        ),
    ],
)
def test_tiny_cpu_variant(script, args, expect):
    (result,) = _run(script, *args)
    assert expect <= result.keys()
    assert result["torch"] and result["device"]
    assert result["tokens_per_s"] > 0


def test_ray_learners_one_and_two_ranks():
    one, two = _run(
        "ray_learners.py", "--size", "tiny", "--world", "2", "--batch", "4", "--micro", "2",
        "--steps", "2", timeout=300,
    )  # fmt: skip
    assert (one["world"], two["world"]) == (1, 2)
    # weak scaling: twice the samples per step on two ranks
    assert two["tokens_per_step"] > 1.5 * one["tokens_per_step"]
    expected = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    assert two["scaling_efficiency"] == pytest.approx(expected, abs=1e-3)
    assert all(abs(x) < 10 for x in one["losses"] + two["losses"])


def test_train_layouts_reads_opd_trains_own_metrics():
    (r, *_) = _run(
        "train_layouts.py", "--size", "tiny", "--teacher", "tiny-teacher", "--layouts",
        "1-colocated", "--steps", "3", "--prompts-per-gpu", "4", "--new-tokens", "8",
        "--prompt-words", "8", "--micro", "4", timeout=400,
    )  # fmt: skip
    assert r["layout"] == "1-colocated" and "error" not in r, r
    assert r["steps_timed"] == 2  # steps 2 and 3; step 1 is warm-up
    assert 0 < r["completion_tokens_per_step"] <= 4 * 8  # 4 prompts, 8 new tokens at most
    phases = sum(r[f"{k}_s"] for k in ("rollout", "teacher", "learn", "sync"))
    assert 0 < phases <= r["step_s"] * 1.05  # medians of phases, not a decomposition
    assert r["sync_bytes"] > 0
