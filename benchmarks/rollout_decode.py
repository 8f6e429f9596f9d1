"""Rollout decode throughput and colocated weight sync, against memory-bandwidth bounds.

    python benchmarks/rollout_decode.py --size tiny --batches 4 --new-tokens 16   # CPU
    python benchmarks/rollout_decode.py --size student-0.6b --batches 8 64 256     # GPU

Runs opd's `RolloutWorker` (vLLM, engine in this process) on random prompts of a random-init
Qwen2 shape and times `generate` for each batch size (one warm-up call, then the median of
`--repeats`). Each decode step must read every weight the step uses (the decoder layers and
the LM head, bf16) plus the keys and values of every sequence's context; the sum of those
bytes over the steps, over the HBM bandwidth, is the floor (prefill and sampling are not in
it, so the fraction is conservative). Then the colocated weight sync: an HF copy of the model
on the same device is loaded into vLLM's weights through `reload_weights`
(`RolloutWorker.load_weights_from_tensors`); its floor is reading and writing 2 N bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_folder, hbm_bandwidth, param_counts, random_prompts, report, timed  # noqa: E402,I001


def decode_bytes(shape: dict, batch: int, prompt: int, new: int, nbytes: int = 2) -> float:
    """Bytes a decode must read: per step, the weights once and each sequence's KV cache."""
    counts = param_counts(shape)
    head = counts["head"] or counts["embed"]
    weights = (counts["layers"] + head) * nbytes
    d = shape["hidden_size"] // shape["num_attention_heads"]
    kv_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * d * nbytes
    kv = sum(batch * (prompt + s) * kv_token for s in range(new))
    return new * weights + kv


def copy_bandwidth() -> float | None:
    """Measured device-to-device copy rate (bytes read + written per second)."""
    if not torch.cuda.is_available():
        return None
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 20 * a.numel() / (time.perf_counter() - t0)


# Sampling settings beside the worker's own (a seed per request, the sampled token's log-prob):
# what each costs on the host, measured by calling vLLM directly.
VARIANTS = {
    "no-seed": {"seed": False, "logprobs": 0},
    "no-logprobs": {"seed": True, "logprobs": None},
    "bare": {"seed": False, "logprobs": None},
}


def time_variant(llm, prompts: list[list[int]], name: str, new_tokens: int, repeats: int):
    """Median seconds of `generate` with variant `name`'s settings, and the tokens it made."""
    from vllm import SamplingParams

    v = VARIANTS[name]
    times, generated = [], 0
    for r in range(repeats + 1):
        params = [
            SamplingParams(
                temperature=1.0,
                max_tokens=new_tokens,
                seed=1000 * r + i if v["seed"] else None,
                logprobs=v["logprobs"],
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        generated = sum(len(o.outputs[0].token_ids) for o in out)
    return statistics.median(times[1:]), generated


def requests(prompts: list[list[int]], seed: int) -> list:
    """One GenerationRequest per prompt, seeded `seed + i`."""
    from opd.samples import GenerationRequest, Sample

    return [GenerationRequest(Sample(i, 0, str(i), [], p), seed + i) for i, p in enumerate(prompts)]


def print_host_profile(worker, prompts: list[list[int]], new_tokens: int) -> None:
    """cProfile of one `generate`: where the host spends a decode step (stdout)."""
    import cProfile
    import pstats

    reqs = requests(prompts, 7)
    prof = cProfile.Profile()
    prof.enable()
    worker.generate(reqs, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
    prof.disable()
    print(f"-- host profile: one generate, batch {len(prompts)}, {new_tokens} tokens", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def weight_sums(worker) -> dict[str, float]:
    """Sum of each vLLM parameter (engine in this process): which weights a load changed."""

    def sums(w):
        model = w.model_runner.get_model()
        return {n: float(p.detach().float().sum()) for n, p in model.named_parameters()}

    return worker.llm.collective_rpc(sums)[0]


def compare(a: list[tuple], b: list[tuple]) -> dict:
    """How far two `seeded_generate` outputs are apart: same tokens, largest log-prob gap."""
    same = sum(x[0] == y[0] for x, y in zip(a, b))
    gap = max(
        (abs(p - q) for x, y in zip(a, b) if x[0] == y[0] for p, q in zip(x[1], y[1])), default=0
    )
    return {"same_tokens": f"{same}/{len(a)}", "max_logprob_gap": gap}


def seeded_generate(worker, prompts: list[list[int]], new_tokens: int) -> list[tuple]:
    """(tokens, log-probs) per prompt, with the same seeds on every call."""
    reqs = requests(prompts, 99)
    _, out = worker.generate(reqs, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
    return [(tuple(s.completion_ids), tuple(s.logprobs or ())) for s in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    ap.add_argument("--cudagraph-mode", default="FULL_DECODE_ONLY",
                    help="with compile mode 0; `default`: vLLM's own compile and CUDA graphs "
                    "(opd's GPU default)")  # fmt: skip
    ap.add_argument("--vllm-memory", type=float, default=0.5)
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=sorted(VARIANTS),
        help="also time vLLM directly with these sampling settings (host-cost breakdown)",
    )
    ap.add_argument("--cprofile", action="store_true", help="host profile of one generate")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from transformers import AutoModelForCausalLM

    from opd.config.schema import RolloutConfig
    from opd.rollout.worker import RolloutWorker

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    folder = tempfile.mkdtemp()
    n_params = build_folder(args.size, folder, dtype)
    shape = SHAPES[args.size]
    compilation = None
    if cuda and not args.eager and args.cudagraph_mode != "default":
        compilation = {"mode": 0, "cudagraph_mode": args.cudagraph_mode}
    t0 = time.perf_counter()
    worker = RolloutWorker(
        folder,
        RolloutConfig(
            dtype=dtype,
            max_model_len=args.prompt_len + args.new_tokens + 8,
            enforce_eager=args.eager or not cuda,
            gpu_memory_utilization=args.vllm_memory if cuda else None,
            kv_cache_memory_bytes=4 * 2**30 if cuda else None,  # no profiling next to others
        ),
        seed=0,
        device="cuda" if cuda else "cpu",
        compilation_config=compilation,
    )
    startup = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    bw = hbm_bandwidth(device)
    copy_bw = copy_bandwidth()
    common = {
        "size": args.size,
        "params": n_params,
        "dtype": dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "cuda_graphs": compilation["cudagraph_mode"]
        if compilation
        else ("vLLM's default" if cuda and not args.eager else "none (eager)"),
        "engine_startup_s": round(startup, 1),
        "copy_bytes_per_s": copy_bw,
    }
    for b in args.batches:
        prompts = random_prompts(b, args.prompt_len, shape["vocab_size"], seed=b)
        times, generated = [], 0
        for r in range(args.repeats + 1):
            reqs = requests(prompts, 1000 * r)
            t0 = time.perf_counter()
            _, out = worker.generate(
                reqs, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0
            )
            if r:
                times.append(time.perf_counter() - t0)
                generated = sum(s.n_tokens for s in out)
        sec = statistics.median(times)
        result = {
            "benchmark": "rollout_decode",
            **common,
            "batch": b,
            "seconds": round(sec, 4),
            "generated_tokens": generated,
            "tokens_per_s": round(generated / sec, 1),
        }
        if bw:
            floor = decode_bytes(shape, b, args.prompt_len, args.new_tokens) / bw
            result["bandwidth_floor_s"] = round(floor, 4)
            result["bandwidth_fraction"] = round(floor / sec, 4)
        report(result)
        for name in args.variants:
            sec, made = time_variant(worker.llm, prompts, name, args.new_tokens, args.repeats)
            report(
                {
                    "benchmark": "rollout_decode",
                    **common,
                    "batch": b,
                    "variant": name,
                    "seconds": round(sec, 4),
                    "generated_tokens": made,
                    "tokens_per_s": round(made / sec, 1),
                }
            )
        if args.cprofile and b == args.batches[0]:
            print_host_profile(worker, prompts, args.new_tokens)

    # colocated weight sync: an HF copy on the same device -> vLLM's weights
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    source = source.to("cuda" if cuda else "cpu")
    named = [(n, p.detach()) for n, p in source.named_parameters()]
    nbytes = sum(p.numel() * p.element_size() for _, p in named)
    # Perturbed weights: both load paths must give the same model, and a different one from
    # the original (so a load that did nothing cannot pass).
    gen = torch.Generator(device=named[0][1].device).manual_seed(0)
    perturbed = [
        (n, t + 0.02 * torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype))
        for n, t in named
    ]
    check = prompts[:4]
    original, sums_original = seeded_generate(worker, check, 32), weight_sums(worker)
    after, direct = {}, worker.direct_load_applies()
    for path in ("rebuild", "direct"):  # vLLM's per-layer reload, then the direct copy
        os.environ["OPD_VLLM_DIRECT_LOAD"] = "1" if path == "direct" else "0"
        times = [
            timed(worker.load_weights_from_tensors, named, v) for v in range(1, args.repeats + 2)
        ]
        worker.load_weights_from_tensors(perturbed, 0)
        after[path] = seeded_generate(worker, check, 32)
        worker.load_weights_from_tensors(named, 0)
        sec = statistics.median(times[1:])
        result = {
            "benchmark": "weight_sync_colocated",
            **common,
            "load_path": "direct" if path == "direct" and direct else "rebuild",
            "bytes": nbytes,
            "seconds": round(sec, 4),
            "sync_times": [round(t, 4) for t in times],
        }
        if bw:
            result["floor_s"] = round(2 * nbytes / bw, 5)  # read + write once, datasheet HBM
            result["bandwidth_fraction"] = round(2 * nbytes / bw / sec, 4)
        report(result)
    os.environ.pop("OPD_VLLM_DIRECT_LOAD")
    restored, sums_restored = seeded_generate(worker, check, 32), weight_sums(worker)
    changed = [n for n in sums_original if sums_original[n] != sums_restored[n]]
    report(
        {
            "benchmark": "weight_sync_colocated",
            **common,
            "paths_agree": after["rebuild"] == after["direct"],
            "perturbed_differs": after["rebuild"] != original,
            "restored_matches": restored == original,
            "restored_vs_original": compare(restored, original),
            "weights_changed_by_restore": f"{len(changed)}/{len(sums_original)}",
            "first_changed": changed[:6],
        }
    )


if __name__ == "__main__":
    main()
