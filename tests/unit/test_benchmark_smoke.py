"""The GPU benchmarks' tiny CPU variants run and print well-formed JSON lines.

The learner and teacher ones take well under 20 s on the 2-core CPU; the two that start Ray
(`ray_learners.py`, `train_layouts.py`: learner ranks as actors, and `opd train` itself) take
30-60 s and are checked for their numbers' consistency. The other vLLM ones
(`rollout_decode.py`, `split_step.py --layout colocated`) and `trl_distill.py` (which needs
TRL, not installed here) are run by hand (benchmarks/RESULTS.md says how); the harness that
compares `opd train` with TRL (`opd_vs_trl_train.py`) runs its tiny workload's async opd row.
"""

from __future__ import annotations

import json
import math
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


# The tiny Qwen2 shape (benchmarks/common.py), counted by hand: per decoder layer q, k, v
# (128 x 128 weights + 128 biases each; 2 KV heads of 64), o (128 x 128), the MLP (3 x 128 x
# 256) and two RMSNorms (2 x 128): 164,480; two layers 328,960; the embedding and the untied
# LM head 384 x 128 each; the final norm 128.
TINY_LAYERS = 2 * (3 * (128 * 128 + 128) + 128 * 128 + 3 * 128 * 256 + 2 * 128)
TINY_PARAMS = TINY_LAYERS + 2 * 384 * 128 + 128
PEAK = 1e8  # a made-up device peak (FLOP/s), so that the CPU runs report an MFU to check


def _tiny_forward_flops(seqs):
    """A forward pass over (prompt, completion) sequences: 2 FLOPs per decoder weight per
    token, QK^T and AV on the causal triangle (4 x 128 per query-key pair, 2 layers), and the
    LM head (2 x 128 x 384) on completion positions."""
    return sum(
        2 * TINY_LAYERS * (p + c) + 2 * 4 * 128 * (p + c) * (p + c + 1) / 2 + 2 * 128 * 384 * c
        for p, c in seqs
    )


def _per_second(got, amount, seconds, digits):
    """`got` is amount / s rounded to `digits`, for some s that rounds to `seconds` (4 places)."""
    half = 0.5 * 10**-digits + 1e-9
    assert amount / (seconds + 5e-5) - half <= got <= amount / (seconds - 5e-5) + half, (
        got,
        amount / seconds,
    )


def _check_step_rates(r):
    """A row of `step_rates` against its own raw numbers, redone by hand."""
    tokens, times, world = r["step_tokens"], r["step_times"], r["world"]
    assert len(tokens) == len(times) >= 2  # two timed steps: a token/time mispairing shows
    assert r["tokens_per_s"] == pytest.approx(sum(tokens) / sum(times), abs=0.051)
    assert r["tokens_per_step"] == pytest.approx(sum(tokens) / len(tokens), abs=0.051)
    assert r["seconds_per_step"] == pytest.approx(sum(times) / len(times), abs=5.1e-5)
    assert r["params"] == TINY_PARAMS and r["flops_per_token"] == 6 * TINY_PARAMS
    assert r["peak_flops"] == PEAK
    mfu = 6 * TINY_PARAMS * sum(tokens) / (sum(times) * world * PEAK)
    assert r["mfu"] == pytest.approx(mfu, abs=5.1e-5)
    mfu_work = sum(r["step_work_flops"]) / (sum(times) * world * PEAK)
    assert r["mfu_work"] == pytest.approx(mfu_work, abs=5.1e-5)
    # the work of a step: more than the decoder's products on its tokens (x3, forward and
    # backward), less than that plus attention and the LM head on every token at full length
    for n, work in zip(tokens, r["step_work_flops"]):
        assert 6 * TINY_LAYERS * n < work < 6 * (TINY_LAYERS + 4 * 128 * n + 128 * 384) * n


def test_learner_step_rates_are_its_raw_numbers_divided():
    (r,) = _run(
        "learner_step.py", "--size", "tiny", "--configs", "2x2", "--steps", "3",
        "--prompt", "8", "16", "--completion", "8", "16", "--peak-flops", str(PEAK),
    )  # fmt: skip
    assert r["torch"] and r["device"] and r["world"] == 1 and r["packing"]
    assert all(2 * (8 + 8) <= n <= 2 * (16 + 16) for n in r["step_tokens"])  # 2 samples
    _check_step_rates(r)


def test_teacher_scoring_rates_are_its_raw_numbers_divided():
    (r,) = _run(
        "teacher_scoring.py", "--size", "tiny", "--samples", "2", "--budgets", "2048",
        "--steps", "1", "--peak-flops", str(PEAK),
    )  # fmt: skip
    assert r["torch"] and r["device"] and r["token_budget"] == 2048
    seqs = r["sequences"]
    assert len(seqs) == 2 and all(64 <= p <= 256 and 128 <= c <= 1024 for p, c in seqs)
    tok = sum(p + c for p, c in seqs)
    assert r["tokens_per_call"] == tok and r["params"] == TINY_PARAMS
    assert r["seconds"] == sorted(r["call_times"])[len(r["call_times"]) // 2]  # the median
    _per_second(r["tokens_per_s"], tok, r["seconds"], 1)
    _per_second(r["mfu"], 2 * TINY_PARAMS * tok / PEAK, r["seconds"], 4)
    _per_second(r["mfu_work"], _tiny_forward_flops(seqs) / PEAK, r["seconds"], 4)


def test_ray_learners_one_and_two_ranks():
    one, two = _run(
        "ray_learners.py", "--size", "tiny", "--world", "2", "--batch", "4", "--micro", "2",
        "--steps", "3", "--peak-flops", str(PEAK), timeout=600,
    )  # fmt: skip
    assert (one["world"], two["world"]) == (1, 2)
    # weak scaling: twice the samples per step on two ranks
    assert two["tokens_per_step"] > 1.5 * one["tokens_per_step"]
    for r in (one, two):
        _check_step_rates(r)
    rate = [sum(r["step_tokens"]) / sum(r["step_times"]) for r in (one, two)]
    # the reported value is rounded to 3 decimals and the step times to their own precision
    assert two["scaling_efficiency"] == pytest.approx(rate[1] / (2 * rate[0]), rel=5e-4, abs=6e-4)
    # The loss is -A mean(pi_theta / pi_old) with A = -(log pi_old - log pi_T) = 0.5 on every
    # synthetic token (pi_old = e^-2, pi_T = e^-1.5); a random-init model gives a random token
    # about 1 / 384, and lr 1e-5 hardly moves it in two steps: -0.5 e^2 / 384 on every step.
    init = -0.5 * math.exp(2) / 384
    for loss in one["losses"] + two["losses"]:
        assert loss == pytest.approx(init, rel=0.03)


def test_train_layouts_reads_opd_trains_own_metrics():
    (r, *_) = _run(
        "train_layouts.py", "--size", "tiny", "--teacher", "tiny-teacher", "--layouts",
        "1-colocated", "--steps", "3", "--prompts-per-gpu", "4", "--new-tokens", "8",
        "--prompt-words", "8", "--micro", "4", timeout=400,
    )  # fmt: skip
    assert r["layout"] == "1-colocated" and "error" not in r, r
    assert r["steps_timed"] == 2  # steps 2 and 3; step 1 is warm-up
    assert 0 < r["completion_tokens_per_step"] <= 4 * 8  # 4 prompts, 8 new tokens at most
    _per_second(r["completion_tokens_per_s"], r["completion_tokens_per_step"], r["step_s"], 1)
    phases = sum(r[f"{k}_s"] for k in ("rollout", "teacher", "learn", "sync"))
    assert 0 < phases <= r["step_s"] * 1.05  # medians of phases, not a decomposition
    assert r["sync_bytes"] > 0


def test_opd_vs_trl_harness_runs_an_opd_row_and_writes_its_table(tmp_path):
    out = tmp_path / "tiny"
    lines = _run(
        "opd_vs_trl_train.py", "--workload", "tiny", "--rows", "opd-sampled-async",
        "--root", str(tmp_path / "root"), "--out", str(out), timeout=500,
    )  # fmt: skip
    # the row's line, then the table's raw lines repeat it
    r = next(x for x in lines if x.get("benchmark") == "opd_vs_trl_train")
    assert r["row"] == "opd-sampled-async" and "error" not in r, r
    # vLLM awake beside the learner (colocated), generating one step ahead
    assert r["max_staleness"] == 1 and r["placement"] == "colocated"
    assert 0 < r["completion_tokens_per_step"] <= 4 * 2 * 8  # 4 prompts x 2 samples x 8 tokens
    _per_second(r["completion_tokens_per_s"], r["completion_tokens_per_step"], r["step_s"], 1)
    table = (tmp_path / "tiny.md").read_text()
    assert "| opd-sampled-async |" in table and "rollout.max_staleness 1" in table
    lines = (tmp_path / "tiny.jsonl").read_text().splitlines()
    assert [json.loads(x)["row"] for x in lines] == ["opd-sampled-async"]
