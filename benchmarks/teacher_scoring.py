"""Teacher scoring throughput as a fraction of the device's peak (MFU).

    python benchmarks/teacher_scoring.py --size tiny                          # CPU smoke
    python benchmarks/teacher_scoring.py --size qwen2.5-7b --budgets 32768 65536 131072

Runs the real `TeacherScorer.score` (token-budget batches, packed decoder pass, chunked
log-softmax) with the `at_ids` signal (log-probs at the student's top-k ids) on synthetic
variable-length samples, for each token budget in turn on one model. MFU = 2 N T / (s x peak)
with N all parameters and T all tokens (the issue's definition); `mfu_work` counts the FLOPs
the pass must do instead (decoder products on every token, causal attention, the LM head on
completion positions). The scores take O(T k) memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, forward_flops, peak_flops, report  # noqa: E402


def samples_for(n: int, k: int, vocab: int, rng: random.Random, tensor_topk: bool):
    from opd.samples import Sample

    out = []
    for i in range(n):
        p, c = rng.randint(64, 256), rng.randint(128, 1024)
        topk = torch.randint(0, vocab, (c, k)) if tensor_topk else None
        if not tensor_topk:
            row = [rng.randrange(vocab) for _ in range(k)]
            topk = [list(row) for _ in range(c)]
        out.append(
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
                topk_ids=topk,
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[32768])
    ap.add_argument("--chunk", type=int, default=2048, help="teacher.logprob_chunk_tokens")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--topk-format",
        choices=("list", "tensor"),
        default="list",
        help="student top-k ids as Python lists (what the rollout worker sends) or a tensor",
    )
    ap.add_argument("--pad", action="store_true", help="the padded path instead of packing")
    ap.add_argument("--compile", action="store_true", help="decoder layers via torch.compile")
    ap.add_argument("--profile", action="store_true", help="one more call under the profiler")
    ap.add_argument("--peak-flops", type=float, help="FLOP/s of the device, instead of the table")
    args = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.modeling import packing

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = Qwen2Config(**SHAPES[args.size], max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if args.compile:
        from opd.modeling.compile import compile_layers

        compile_layers(model)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_flops or peak_flops(name)
    with packing.padded() if args.pad else contextlib.nullcontext():
        for budget in args.budgets:
            report(run_budget(args, model, n_params, budget, peak))


def run_budget(args, model, n_params: int, budget: int, peak: float | None) -> dict:
    """`args.steps` timed `score` calls (after one warm-up) with `budget` tokens per pass."""
    from opd.config.schema import TeacherConfig
    from opd.objectives import TeacherRequest
    from opd.teacher.scorer import TeacherScorer

    cuda = torch.cuda.is_available()
    vocab = model.config.vocab_size
    cfg = TeacherConfig(path="-", token_budget=budget, logprob_chunk_tokens=args.chunk)
    # The model stays on its device; the scores come back on the host, as in `opd train`.
    scorer = TeacherScorer(cfg, model=model, tokenizer=None)
    # samples carry the teacher's prompt ids already: no chat template needed here
    scorer.prompt_ids = lambda sample: sample.prompt_ids
    request = TeacherRequest("at_ids", k=args.k)
    rng = random.Random(0)
    times, seqs_per_call = [], []
    for step in range(args.steps + 1):
        samples = samples_for(args.samples, args.k, vocab, rng, args.topk_format == "tensor")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        scorer.score(samples, request)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
            seqs_per_call.append([(len(s.prompt_ids), s.n_tokens) for s in samples])
    sec = statistics.median(times)
    seqs = seqs_per_call[times.index(sec)]
    tok = sum(p + c for p, c in seqs)
    prof = {}
    if args.profile and cuda:
        from learner_step import profile_step

        prof = profile_step(lambda s=scorer, x=samples, r=request: s.score(x, r))
    result = {
        "benchmark": "teacher_scoring",
        "size": args.size,
        "params": n_params,
        "samples": args.samples,
        "k": args.k,
        "token_budget": budget,
        "chunk": args.chunk,
        "topk_format": args.topk_format,
        "packing": not args.pad,
        "tokens_per_call": tok,
        "sequences": seqs,  # (prompt, completion) lengths of the call timed
        "seconds": round(sec, 4),
        "call_times": [round(t, 4) for t in times],
        "tokens_per_s": round(tok / sec, 1),
        "compiled_layers": args.compile,
        **prof,
    }
    if peak:
        result["mfu"] = round(2 * n_params * tok / sec / peak, 4)
        result["mfu_work"] = round(forward_flops(SHAPES[args.size], seqs) / sec / peak, 4)
    if cuda:
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


if __name__ == "__main__":
    main()
