"""The shipped simct recipe, for real: Gemma-3-270M (from its GGUF parts on the package index)
teaches SmolLM2-135M-Instruct across tokenizers, with vLLM rollouts and a DeepSpeed learner."""

from pathlib import Path

import pytest

from opd.config import load_config
from opd.loop import train
from opd.metrics import read_metrics

pytestmark = pytest.mark.e2e

RECIPE = Path(__file__).parents[2] / "recipes/simct/gemma3-270m_to_smollm2-135m.yaml"


def test_simct_recipe_runs_with_real_weights(ray_session, tmp_path):
    cfg = load_config(
        RECIPE,
        [
            f"run.output_dir={tmp_path}",
            "run.progress=false",
            "trainer.steps=2",
            "eval.every=2",
            "eval.heldout_prompts=4",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=32",
            "checkpoint.every=0",
            "checkpoint.export_student=false",
            "cluster.timeout_s=900",
        ],
    )
    train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        kinds = r["simct/one_to_one_tokens"] + r["simct/span_tokens"] + r["simct/dropped_tokens"]
        assert kinds == pytest.approx(1.0)
        # Most of the two tokenizations agree token for token; the rest is realigned in spans.
        assert 0.5 < r["simct/one_to_one_tokens"] < 1.0
        assert r["simct/span_tokens"] > 0 and r["simct/mean_span_len"] >= 1.0
        assert r["train/loss"] == pytest.approx(r["simct/aligned_kl"])  # mode simct: all kinds
        assert r["train/loss"] > 0 and r["train/skipped_steps"] == 0
        assert r["rollout/policy_version"] == r["step"] - 1
    for r in (rows[0], rows[2]):
        total = r["heldout/simct/kl_one_to_one"] + r["heldout/simct/kl_span"]
        assert r["heldout/simct/aligned_kl"] == pytest.approx(total)
        assert r["heldout/simct/aligned_kl"] > 0
