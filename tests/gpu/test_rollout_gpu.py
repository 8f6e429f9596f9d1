"""The rollout worker's in-process weight hand-over (`RolloutWorker.load_weights_from_tensors`)
on a GPU: perturbed weights change what it samples, and the original weights handed back
restore the very tokens and log-probs. Run in a subprocess, so that the engine's GPU memory is
gone before the other GPU tests start theirs."""

import json
import subprocess
import sys

CHECK = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from opd.config.schema import RolloutConfig
from opd.samples import GenerationRequest, Sample
from opd.rollout.worker import RolloutWorker

path = sys.argv[1]
cfg = RolloutConfig(dtype="bfloat16", gpu_memory_utilization=0.15, max_model_len=256,
                    enforce_eager=True)
worker = RolloutWorker(path, cfg, seed=0, device="cuda")
requests = [GenerationRequest(Sample(i, 0, str(i), [], [1, 5, 9, 13]), seed=100 + i)
            for i in range(4)]

def sample():
    _, out = worker.generate(requests, max_new_tokens=12, temperature=1.0, top_p=1.0)
    return [(s.completion_ids, s.logprobs) for s in out]

before = sample()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
named = [(n, p.detach()) for n, p in model.named_parameters()]
g = torch.Generator(device="cuda").manual_seed(0)
noisy = [(n, t + 0.5 * torch.randn(t.shape, generator=g, device="cuda", dtype=t.dtype))
         for n, t in named]
worker.load_weights_from_tensors(noisy, 1)
perturbed = sample()
worker.load_weights_from_tensors(named, 2)
after = sample()
print(json.dumps({"same_after_restore": after == before, "changed": perturbed != before,
                  "version": worker.version}))
"""


def test_in_process_weight_handover_changes_and_restores_the_samples(tiny_pair):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(tiny_pair["student"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"same_after_restore": True, "changed": True, "version": 2}, result
