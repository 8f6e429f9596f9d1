"""Teacher scoring throughput as a fraction of the device's peak (MFU).

    python benchmarks/teacher_scoring.py --size tiny         # CPU smoke
    python benchmarks/teacher_scoring.py --size qwen2.5-7b   # GPU: random init, real shape

Runs the real `TeacherScorer.score` (token-budget batches, chunked log-softmax) with the
`at_ids` signal (log-probs at the student's top-k ids) on synthetic variable-length samples;
MFU = 2 * N_params * tokens / (seconds * peak). Memory for the scores is O(T k).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from common import SHAPES, peak_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--budget", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.config.schema import TeacherConfig
    from opd.objectives import TeacherRequest
    from opd.rollout.batch import Sample
    from opd.teacher.scorer import TeacherScorer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = Qwen2Config(**SHAPES[args.size], max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TeacherConfig(path="-", token_budget=args.budget, logprob_chunk_tokens=2048)
    scorer = TeacherScorer.from_model(cfg, model, tokenizer=None)
    # samples carry the teacher's prompt ids already: no chat template needed here
    scorer.prompt_ids = lambda sample, context="prompt": sample.prompt_ids
    vocab, rng = config.vocab_size, random.Random(0)
    times, tokens = [], []
    for step in range(args.steps + 1):
        samples = []
        for i in range(args.samples):
            p, c = rng.randint(64, 256), rng.randint(128, 1024)
            samples.append(
                Sample(
                    i,
                    0,
                    str(i),
                    [],
                    [rng.randrange(vocab) for _ in range(p)],
                    [rng.randrange(vocab) for _ in range(c)],
                    [0.0] * c,
                    "length",
                    0,
                    topk_ids=[[rng.randrange(vocab) for _ in range(args.k)]] * c,
                )
            )
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scorer.score(samples, TeacherRequest("at_ids", k=args.k))
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(s.prompt_ids) + s.n_tokens for s in samples))
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    sec, tok = statistics.median(times), statistics.median(tokens)
    result = {
        "benchmark": "teacher_scoring",
        "device": name,
        "torch": torch.__version__,
        "size": args.size,
        "params": n_params,
        "samples": args.samples,
        "k": args.k,
        "tokens_per_call": tok,
        "seconds": sec,
        "tokens_per_s": tok / sec,
    }
    peak = peak_flops(name)
    if peak:
        result["mfu"] = 2 * n_params * tok / sec / peak
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))


if __name__ == "__main__":
    main()
