"""Learner train-step throughput as a fraction of the device's peak (MFU).

    python benchmarks/learner_step.py --size tiny                         # CPU smoke
    python benchmarks/learner_step.py --size qwen2.5-1.5b --configs 64x16 64x16:ckpt 64x16:pad
    python benchmarks/learner_step.py --size qwen2.5-1.5b --world 2 --configs 64x16:zero3

Runs the real `opd.learner.worker.Learner` (DeepSpeed) on variable-length synthetic batches
with the sampled reverse-KL objective, one configuration after another in one process (one
process per rank with `--world N`, one GPU each). A configuration is BATCHxMICRO (samples
per rank per step, samples per micro-batch) with flags: `ckpt` (activation checkpointing),
`zeroN` (ZeRO stage, default 2 on GPU), `pad` (the padded path instead of packing),
`compile` (each decoder layer through torch.compile), `cacheG` (learner.logits_cache_gb = G:
LM-head logits kept for backward, not recomputed; without it 0), `prof` (one more step under
the torch profiler: summed kernel time against wall time, top kernels on stderr).

Reported per configuration, over the measured steps (the first step is warm-up and not
counted), each step's tokens paired with that step's own time: `step_tokens` (prompt +
completion tokens of every step, all ranks) and `step_times` (seconds), their means
`tokens_per_step` and `seconds_per_step`, `tokens_per_s` = sum(step_tokens) /
sum(step_times), and MFU = flops_per_token x sum(step_tokens) / (sum(step_times) x world x
peak_flops) with `flops_per_token` = 6 N, N all parameters (the issue's definition).
`mfu_work` puts `step_work_flops` in the numerator instead: the FLOPs each step must do
(decoder products on every token, causal attention, the LM head on completion tokens only, x3
for forward + backward; recomputation not counted). `peak_flops` is the device's dense bf16
peak (`--peak-flops` overrides it; on a CPU there is none and no MFU is reported).

    python benchmarks/learner_step.py --replay benchmarks/results/h200-learner-logits-cache.log

recomputes rows logged before 2026-11-30, which divided the first timed step's tokens by the
median step time: the batches are seeded by the step number, so they are drawn again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, forward_flops, peak_flops, report, timed, visible_devices  # noqa: E402


def build(size: str, dtype: str, folder: str) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[size], max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def batch(n: int, prompt: tuple[int, int], completion: tuple[int, int], vocab: int, seed: int):
    from opd.samples import Sample
    from opd.signals.sampled import TokenScores

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
                teacher=TokenScores(logprobs_BT=torch.full((1, c), -1.5)),
            )
        )
    return out


def parse(spec: str, cuda: bool) -> dict:
    head, *flags = spec.split(":")
    b, m = (int(x) for x in head.split("x"))
    zero = next((int(f[4:]) for f in flags if f.startswith("zero")), 2 if cuda else 0)
    return dict(
        spec=spec,
        batch=b,
        micro=m,
        ckpt="ckpt" in flags,
        zero=zero,
        pad="pad" in flags,
        compile="compile" in flags,
        prof="prof" in flags,
        # `cacheG`: learner.logits_cache_gb = G (kept LM-head logits); default 0, recompute
        cache_gb=next((float(f[5:]) for f in flags if f.startswith("cache")), 0.0),
    )


def profile_step(step_fn) -> dict:
    """One step under the torch profiler: summed CUDA kernel time against wall time, and the
    top kernels (printed)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernel = sum(e.self_device_time_total for e in events) / 1e6
    print(events.table(sort_by="self_device_time_total", row_limit=15), file=sys.stderr)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:8]
    return {
        "profile_wall_s": round(wall, 4),
        "profile_cuda_kernel_s": round(kernel, 4),
        "profile_top": [(e.key[:60], round(e.self_device_time_total / 1e6, 4)) for e in top],
    }


def run_config(args, c: dict, folder: str, rank: int, world: int, port: int, cuda: bool) -> dict:
    from opd.config.schema import LearnerConfig, ObjectiveConfig
    from opd.learner.worker import Learner

    dtype = "bfloat16" if cuda else "float32"
    cfg = LearnerConfig(
        dtype=dtype,
        micro_batch_size=c["micro"],
        zero_stage=c["zero"],
        gradient_checkpointing=c["ckpt"],
        lr=1e-6,
        logprob_chunk_tokens=args.chunk,
        logits_cache_gb=c["cache_gb"],
    )
    learner = Learner(
        rank,
        world,
        "127.0.0.1",
        port,
        folder,
        cfg,
        ObjectiveConfig(),
        total_steps=args.steps + 1,
        grad_accum_steps=c["batch"] // c["micro"],
        seed=0,
        device="cuda" if cuda else "cpu",
    )
    if c["compile"]:  # each decoder layer through torch.compile (elementwise ops fused)
        from opd.modeling.compile import compile_layers

        compile_layers(learner.model)
    shape = SHAPES[args.size]
    times, seqs_per_step = [], []
    for step in range(args.steps + 1):
        # every rank draws the whole step's batch and keeps its shard
        full = batch(c["batch"] * world, args.prompt, args.completion, shape["vocab_size"], step)
        mine = full[rank::world]
        normalizer = sum(s.n_tokens for s in full)
        sec = timed(learner.train_step, normalizer, mine)
        if step:  # the first step includes warm-up
            times.append(sec)
            seqs_per_step.append([(len(s.prompt_ids), s.n_tokens) for s in full])
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    prof = {}
    if c["prof"] and cuda:
        full = batch(c["batch"] * world, args.prompt, args.completion, shape["vocab_size"], 1)
        mine, normalizer = full[rank::world], sum(s.n_tokens for s in full)
        train_step = learner.train_step
        prof = profile_step(lambda: train_step(normalizer, mine))
        del train_step
    del learner
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = {
        "config": c["spec"],
        "world": world,
        "zero": c["zero"],
        "checkpointing": c["ckpt"],
        "packing": not c["pad"],
        "batch_per_rank": c["batch"],
        "micro_batch": c["micro"],
        "peak_memory_gb": round(peak_mem, 2) if peak_mem is not None else None,
        "compiled_layers": c["compile"],
        **prof,
    }
    return out, seqs_per_step, times


def step_rates(
    step_seqs: list[list[tuple[int, int]]],
    step_times: list[float],
    world: int,
    shape: dict,
    n_params: int,
    peak: float | None,
) -> dict:
    """Throughput and MFU over the timed steps, every step's (prompt, completion) lengths
    paired with its own seconds: tokens and FLOPs summed over the steps, divided by the summed
    seconds. The raw inputs come with the rates, so each rate can be redone by hand from the
    JSON line (times are rounded before anything is computed from them)."""
    times = [round(t, 6) for t in step_times]
    tokens = [sum(p + c for p, c in seqs) for seqs in step_seqs]
    work = [round(3 * forward_flops(shape, seqs)) for seqs in step_seqs]
    total_s, total_tokens = sum(times), sum(tokens)
    out = {
        "step_tokens": tokens,
        "step_times": times,
        "tokens_per_step": round(total_tokens / len(tokens), 1),
        "seconds_per_step": round(total_s / len(times), 4),
        "tokens_per_s": round(total_tokens / total_s, 1),
        "flops_per_token": 6 * n_params,
        "step_work_flops": work,
        "peak_flops": peak,
    }
    if peak:
        out["mfu"] = round(6 * n_params * total_tokens / (total_s * world * peak), 4)
        out["mfu_work"] = round(sum(work) / (total_s * world * peak), 4)
    return out


def step_batches(n: int, prompt, completion, vocab: int, steps) -> list[list[tuple[int, int]]]:
    """(prompt, completion) lengths of the synthetic batches of the given steps."""
    return [
        [(len(s.prompt_ids), s.n_tokens) for s in batch(n, prompt, completion, vocab, step)]
        for step in steps
    ]


def logged_rows(path: str, benchmark: str) -> list[dict]:
    """The JSON lines of `benchmark` in a log written before `step_tokens` existed."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # progress bars, warnings, printed dicts
                continue
            if isinstance(row, dict) and row.get("benchmark") == benchmark:
                if "step_times" in row and "step_tokens" not in row:
                    rows.append(row)
    return rows


def replay(paths: list[str], prompt, completion) -> None:
    """Recompute logged rows: draw each timed step's batch again (seeds 1..steps) and pair its
    tokens with its time. A row whose logged token count is not the redrawn batch of the step
    the old code picked is refused (different prompt/completion ranges, or another sampler)."""
    for path in paths:
        for row in logged_rows(path, "learner_step"):
            times, world, shape = row["step_times"], row["world"], SHAPES[row["size"]]
            seqs = step_batches(
                row["batch_per_rank"] * world, prompt, completion, shape["vocab_size"],
                range(1, len(times) + 1),
            )  # fmt: skip
            median = statistics.median(times)  # what the old code paired with one batch
            picked = times.index(median) if median in times else 0
            if sum(p + c for p, c in seqs[picked]) != row["tokens_per_step"]:
                raise SystemExit(f"{path}: {row['config']}: the redrawn batches do not match")
            old = ("tokens_per_step", "seconds_per_step", "tokens_per_s", "mfu", "mfu_work")
            new = step_rates(seqs, times, world, shape, row["params"], peak_flops(row["device"]))
            logged = {k: row.pop(k) for k in old if k in row}
            print(json.dumps({**row, **new, "replayed_from": path, "logged": logged}))


def worker(rank: int, world: int, args, folder: str, n_params: int, port: int) -> None:
    from opd.modeling import packing

    if world > 1:  # this rank's GPU first (the learner uses cuda:0); the others stay visible
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(rank, world)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_flops or peak_flops(device)
    for spec in args.configs:
        c = parse(spec, cuda)
        try:
            with packing.padded() if c["pad"] else contextlib.nullcontext():
                out, seqs, times = run_config(args, c, folder, rank, world, port, cuda)
        except Exception as e:  # out of memory, or a configuration that does not run: say so
            out, seqs, times = {"config": spec, "error": f"{type(e).__name__}: {e}"[:300]}, [], []
        if not seqs:  # outside the handler, whose traceback still holds the failed run
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if rank != 0:
            continue
        result = {
            "benchmark": "learner_step",
            "size": args.size,
            "params": n_params,
            "dtype": "bfloat16" if cuda else "float32",
            **out,
        }
        if seqs:
            result.update(step_rates(seqs, times, world, SHAPES[args.size], n_params, peak))
        report(result)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--configs", nargs="+", default=["8x4"])
    ap.add_argument("--world", type=int, default=1, help="ranks, one GPU each")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt", type=int, nargs=2, default=(64, 256))
    ap.add_argument("--completion", type=int, nargs=2, default=(128, 1024))
    ap.add_argument("--chunk", type=int, default=1024, help="learner.logprob_chunk_tokens")
    ap.add_argument("--peak-flops", type=float, help="FLOP/s per device, instead of the table")
    ap.add_argument("--replay", nargs="+", metavar="LOG", help="recompute logged rows, no run")
    args = ap.parse_args()
    if args.replay:
        return replay(args.replay, args.prompt, args.completion)

    from opd.cluster.placement import free_port

    dtype = "bfloat16" if args.world > 1 or torch.cuda.is_available() else "float32"
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        n_params = build(args.size, dtype, folder)
        if args.world == 1:
            worker(0, 1, args, folder, n_params, port)
        else:
            torch.multiprocessing.spawn(
                worker, args=(args.world, args, folder, n_params, port), nprocs=args.world
            )


if __name__ == "__main__":
    main()
