"""The GPU benchmarks' tiny CPU variants run and print one well-formed JSON line each.

Only the two that take well under 20 s on the 2-core CPU are here; the vLLM ones
(`rollout_decode.py`, `opd_vs_trl.py`, `split_step.py --layout colocated`) take a minute or
more at their tiny sizes and are run by hand (benchmarks/RESULTS.md says how).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
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
