"""`opd train` on GPUs with each weight transport, on the tiny models.

Step 1 samples with the initial weights on both sides, so its `reverse_kl/abs_log_ratio` (the
mean |log pi_learner - log pi_vLLM| of the sampled tokens) is the floor set by the two
engines' kernels alone. Every later step samples right after a sync: if the transport, vLLM's
weight load or its sleep/wake cycle lost or garbled a weight, the learner's moved policy and
the sampler's would part (the tiny student moves a lot at lr 1e-3) and the ratio would leave
that floor.
"""

import os
from pathlib import Path

import pytest
import torch

from opd.config import check_resources, load_config
from opd.loop import train
from opd.metrics import read_metrics

RECIPE = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
STEPS = 4

# name: (GPUs, overrides); eager vLLM (start-up in seconds) except for `1-colocated-defaults`,
# which runs the GPU defaults: CUDA IPC sync (`weight_sync: auto`) and vLLM's compile and CUDA
# graphs (`enforce_eager` unset)
LAYOUTS = {
    "1-colocated-defaults": (
        1,
        [
            "cluster.placement=colocated",
            "learner.num_gpus=0.5",
            "rollout.num_gpus=0.4",
            "teacher.num_gpus=0.1",
        ],
    ),
    # a LoRA student on the GPU defaults: the adapters go through vLLM's LoRA support (CUDA
    # graphs, sleep and wake-up) as adapter folders
    "1-colocated-lora": (
        1,
        [
            "cluster.placement=colocated",
            "learner.lora.rank=8",
            "learner.num_gpus=0.5",
            "rollout.num_gpus=0.4",
            "teacher.num_gpus=0.1",
        ],
    ),
    "1-colocated-ipc": (
        1,
        [
            "cluster.placement=colocated",
            "rollout.enforce_eager=true",
            "rollout.weight_sync=ipc",
            "learner.num_gpus=0.5",
            "rollout.num_gpus=0.4",
            "teacher.num_gpus=0.1",
        ],
    ),
    "1-colocated-dir": (
        1,
        [
            "cluster.placement=colocated",
            "rollout.enforce_eager=true",
            "rollout.weight_sync=dir",
            "learner.num_gpus=0.5",
            "rollout.num_gpus=0.4",
            "teacher.num_gpus=0.1",
        ],
    ),
    "2-colocated-ipc": (
        2,
        [
            "cluster.placement=colocated",
            "rollout.enforce_eager=true",
            "rollout.weight_sync=ipc",
            "learner.num_workers=2",
            "rollout.num_workers=2",
            "learner.zero_stage=3",
            "learner.num_gpus=0.5",
            "rollout.num_gpus=0.4",
            "teacher.num_gpus=0.1",
        ],
    ),
    "2-split-nccl": (
        2,
        [
            "rollout.enforce_eager=true",
            "rollout.weight_sync=nccl",
            "learner.num_gpus=1",
            "rollout.num_gpus=0.6",
            "teacher.num_gpus=0.4",
        ],
    ),
    # the control: with async rollouts a step samples with weights one update old, and the
    # ratio must show it (else the checks above could not tell a lost sync either)
    "2-split-nccl-async": (
        2,
        [
            "rollout.enforce_eager=true",
            "rollout.weight_sync=nccl",
            "rollout.max_staleness=1",
            "learner.num_gpus=1",
            "rollout.num_gpus=0.6",
            "teacher.num_gpus=0.4",
        ],
    ),
}


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    ray.init(include_dashboard=False, log_to_driver=True)
    yield int(ray.cluster_resources().get("GPU", 0))
    ray.shutdown()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_step_samples_with_the_learners_weights(layout, tiny_pair, ray_gpus, tmp_path):
    gpus, extra = LAYOUTS[layout]
    if ray_gpus < gpus:
        pytest.skip(f"NOT RUN: {layout} needs {gpus} GPUs, {ray_gpus} visible")
    cfg = load_config(
        RECIPE,
        [
            f"run.output_dir={tmp_path}",
            f"student.path={tiny_pair['student']}",
            f"teacher.path={tiny_pair['teacher']}",
            f"data.train_path={tiny_pair['train']}",
            f"trainer.steps={STEPS}",
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.export_student=false",
            "run.device=cuda",
            "run.progress=false",
            "learner.dtype=bfloat16",
            "rollout.dtype=bfloat16",
            "teacher.dtype=bfloat16",
            "cluster.timeout_s=300",
            *extra,
        ],
    )
    check_resources(cfg)
    train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    if layout == "1-colocated-defaults":  # auto chose the CUDA IPC transport
        assert cfg.rollout.weight_sync == "auto" and cfg.rollout.enforce_eager is None
        assert all("sync/ipc_s" in r for r in rows), rows[0]
    if layout == "1-colocated-lora":  # each push is the adapter folder, a sliver of the model
        full = sum(f.stat().st_size for f in Path(tiny_pair["student"]).glob("*.safetensors"))
        assert all(0 < r["sync/bytes"] < 0.2 * full for r in rows), rows[0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    floor = rows[0]["reverse_kl/abs_log_ratio"]
    print(layout, "abs_log_ratio per step:", [r["reverse_kl/abs_log_ratio"] for r in rows])
    print(layout, "sync seconds per step:", [r["time/sync"] for r in rows])
    assert floor < 0.05  # bf16 kernels of two engines on the same weights
    if layout.endswith("-async"):
        stale = [r for r in rows if r["rollout/staleness"] == 1]
        assert stale and all(r["reverse_kl/abs_log_ratio"] > 5 * floor for r in stale), rows
        return
    for r in rows:
        assert r["train/skipped_steps"] == 0
        assert r["rollout/policy_version"] == r["step"] - 1
        assert r["reverse_kl/abs_log_ratio"] < 3 * floor + 0.01, (layout, r["step"])
        assert ("time/sleep" in r) == (cfg.cluster.placement == "colocated")
    assert torch.cuda.is_available()
