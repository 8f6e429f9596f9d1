"""Learner train-step throughput as a fraction of the device's peak (MFU).

    python benchmarks/learner_step.py --size tiny          # CPU smoke
    python benchmarks/learner_step.py --size qwen2.5-1.5b  # GPU: random init, real shape

Runs the real `opd.learner.worker.Learner` (DeepSpeed, world size 1) on variable-length
synthetic batches with the sampled reverse-KL objective, and reports seconds per step and
MFU = 6 * N_params * tokens / (seconds * peak FLOP/s). Attention FLOPs are not counted, so
the figure slightly understates the work done.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time

import torch
from common import SHAPES, peak_flops


def build(size: str, dtype: str, folder: str) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[size], max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def batch(n: int, prompt: tuple[int, int], completion: tuple[int, int], vocab: int, seed: int):
    from opd.rollout.batch import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, c = rng.randint(*prompt), rng.randint(*completion)
        out.append(
            Sample(
                prompt_index=i,
                sample_index=0,
                prompt_id=str(i),
                messages=[],
                prompt_ids=[rng.randrange(vocab) for _ in range(p)],
                completion_ids=[rng.randrange(vocab) for _ in range(c)],
                logprobs=[-2.0] * c,
                finish_reason="length",
                policy_version=0,
                teacher={"logprobs": torch.full((c,), -1.5)},
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompt", type=int, nargs=2, default=(64, 256))
    ap.add_argument("--completion", type=int, nargs=2, default=(128, 1024))
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA ops of a step")
    args = ap.parse_args()

    from opd.cluster.placement import free_port
    from opd.config.schema import LearnerConfig, ObjectiveConfig
    from opd.learner.worker import Learner

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    with tempfile.TemporaryDirectory() as folder:
        n_params = build(args.size, dtype, folder)
        cfg = LearnerConfig(
            dtype=dtype,
            micro_batch_size=args.micro,
            zero_stage=2 if cuda else 0,
            gradient_checkpointing=args.checkpointing,
            lr=1e-6,
        )
        learner = Learner(
            0,
            1,
            "127.0.0.1",
            free_port(),
            folder,
            cfg,
            ObjectiveConfig(),
            total_steps=args.steps + 1,
            grad_accum_steps=args.batch // args.micro,
            seed=0,
            device="cuda" if cuda else "cpu",
        )
        if args.profile and cuda:
            from torch.profiler import ProfilerActivity, profile

            samples = batch(
                args.batch, args.prompt, args.completion, SHAPES[args.size]["vocab_size"], 99
            )
            learner.train_step(samples, sum(s.n_tokens for s in samples))  # warm-up
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                learner.train_step(samples, sum(s.n_tokens for s in samples))
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        times, tokens = [], []
        for step in range(args.steps + 1):
            samples = batch(
                args.batch, args.prompt, args.completion, SHAPES[args.size]["vocab_size"], step
            )
            n_tok = sum(len(s.prompt_ids) + s.n_tokens for s in samples)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            learner.train_step(samples, sum(s.n_tokens for s in samples))
            if cuda:
                torch.cuda.synchronize()
            if step:  # the first step includes warm-up
                times.append(time.perf_counter() - t0)
                tokens.append(n_tok)
    device = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    sec = statistics.median(times)
    tok = statistics.median(tokens)
    peak = peak_flops(device)
    result = {
        "benchmark": "learner_step",
        "device": device,
        "torch": torch.__version__,
        "size": args.size,
        "params": n_params,
        "dtype": dtype,
        "batch": args.batch,
        "micro_batch": args.micro,
        "tokens_per_step": tok,
        "seconds_per_step": sec,
        "tokens_per_s": tok / sec,
        "checkpointing": args.checkpointing,
    }
    if peak:
        result["mfu"] = 6 * n_params * tok / sec / peak
    print(json.dumps(result))


if __name__ == "__main__":
    main()
