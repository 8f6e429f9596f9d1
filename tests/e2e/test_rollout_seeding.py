"""The rollout worker's sampling seeds (`rollout.seed_by`) and its reading of vLLM's flat
log-probs, on one real vLLM-CPU engine in a subprocess (vLLM wants a `__main__` guard):

- seeded per request, a completion does not depend on the rest of the batch;
- seeded per call (`batch`), the same call samples the same tokens and another seed others;
- the log-probs and top-k ids read from the flat format equal vLLM's per-token dicts;
- a batch whose prompts pass vLLM's 4,096-token step budget completes, each request as it
  would alone (a split prefill used to kill the CPU engine: "CPU Generator does not use offset").
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import json, sys

from opd.config.schema import RolloutConfig
from opd.rollout.worker import RolloutWorker
from opd.samples import GenerationRequest, Sample

if __name__ == "__main__":
    from vllm import SamplingParams

    worker = RolloutWorker(sys.argv[1], RolloutConfig(seed_by="batch", max_model_len=256), seed=0)
    prompts = [[1, 5 + i, 9, 13 + 2 * i] for i in range(4)]
    requests = [
        GenerationRequest(Sample(i, 0, str(i), [], p), 100 + i) for i, p in enumerate(prompts)
    ]
    how = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, topk=3)

    def generate(*args):
        metas, samples = worker.generate(*args, **how)
        assert [m.n_tokens for m in metas] == [s.n_tokens for s in samples]
        return [
            {"completion_ids": s.completion_ids, "logprobs": s.logprobs, "topk_ids": s.topk_ids}
            for s in samples
        ]

    out = {
        "request_all": generate(requests),
        "request_two": generate(requests[:2]),
        "batch_a": generate(requests, 7),
        "batch_a_again": generate(requests, 7),
        "batch_b": generate(requests, 8),
    }
    # 120 prompts of 41 tokens: 4,920 prompt tokens, more than one engine step takes
    long = [[1] + [5 + (i * 7 + k) % 90 for k in range(40)] for i in range(120)]
    big = [GenerationRequest(Sample(i, 0, str(i), [], p), 500 + i) for i, p in enumerate(long)]
    out["big"] = generate(big)
    out["big_alone"] = generate(big[-3:])
    # vLLM's own per-token dicts for the per-request seeds: what the flat reading must equal
    params = [
        SamplingParams(temperature=1.0, max_tokens=12, seed=r.seed, logprobs=3, detokenize=False)
        for r in requests
    ]
    dicts = []
    for o in worker.llm.generate([{"prompt_token_ids": p} for p in prompts], params):
        c = o.outputs[0]
        dicts.append({
            "ids": list(c.token_ids),
            "logprobs": [pos[t].logprob for t, pos in zip(c.token_ids, c.logprobs)],
            "topk": [
                [t for t, lp in sorted(pos.items(), key=lambda kv: kv[1].rank) if lp.rank <= 3]
                for pos in c.logprobs
            ],
        })
    out["dicts"] = dicts
    print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def generations(tiny_pair, tmp_path_factory):
    script = tmp_path_factory.mktemp("seeding") / "seeding.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_pair["student"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _ids(results):
    return [r["completion_ids"] for r in results]


def test_per_request_seeds_do_not_depend_on_the_batch(generations):
    assert _ids(generations["request_two"]) == _ids(generations["request_all"])[:2]


def test_a_batch_seed_repeats_its_call_and_another_seed_samples_others(generations):
    assert generations["batch_a_again"] == generations["batch_a"]
    assert _ids(generations["batch_b"]) != _ids(generations["batch_a"])
    assert _ids(generations["batch_a"]) != _ids(generations["request_all"])


def test_a_batch_past_the_step_budget_completes_as_its_requests_alone(generations):
    big = generations["big"]
    assert len(big) == 120 and all(1 <= len(r["completion_ids"]) <= 12 for r in big)
    assert _ids(big[-3:]) == _ids(generations["big_alone"])


def test_flat_log_probs_read_as_vllm_dicts(generations):
    for mine, ref in zip(generations["request_all"], generations["dicts"], strict=True):
        assert mine["completion_ids"] == ref["ids"]
        assert mine["logprobs"] == ref["logprobs"]
        assert mine["topk_ids"] == ref["topk"]
        assert all(len(k) == 3 for k in mine["topk_ids"])
