"""`opd train` itself (Ray actors, vLLM rollouts, teacher, DeepSpeed learners) on 1 and 2
GPUs: step time per phase, weight-sync seconds against their bound, and the scaling from
one GPU to two.

    python benchmarks/train_layouts.py                  # GPU: every layout that fits the GPUs
    python benchmarks/train_layouts.py --size tiny --teacher tiny-teacher --layouts 1-colocated \
        --steps 3 --prompts-per-gpu 4 --new-tokens 16    # CPU smoke

Layouts (per GPU the same batch, so 1 -> 2 GPUs is weak scaling):
- `1-colocated`: one learner rank, one vLLM worker and the teacher on one GPU;
- `2-colocated`: two learner ranks (ZeRO-3 over NCCL), each sharing its GPU with a vLLM
  worker (asleep while the learner updates), the teacher beside them; weights through the
  host's shared-memory folder;
- `1-colocated-ipc`, `2-colocated-ipc`: the same, weights over CUDA IPC (each learner rank
  shares a flat weight buffer with the vLLM worker on its GPU) instead of the folder;
- `2-split`: the learner on GPU 0; vLLM and the teacher on GPU 1; weights over NCCL.

Models: random-init Qwen2 shapes from `common.SHAPES` with a small BPE tokenizer (weights do
not matter for speed; token ids past the tokenizer's vocabulary are never detokenized), so
completions run to `--new-tokens`. Each layout is one `opd train` subprocess; the numbers
are medians over steps 2..N of its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_folder, environment, param_counts, report  # noqa: E402

# GPUs, placement, learner ranks, rollout workers, and each role's share of a GPU
LAYOUTS = {
    "1-colocated": dict(gpus=1, placement="colocated", learners=1, rollouts=1, sync="dir",
                        learner_gpu=0.5, rollout_gpu=0.4, teacher_gpu=0.1),
    "2-colocated": dict(gpus=2, placement="colocated", learners=2, rollouts=2, sync="dir",
                        learner_gpu=0.5, rollout_gpu=0.4, teacher_gpu=0.1),
    "1-colocated-ipc": dict(gpus=1, placement="colocated", learners=1, rollouts=1, sync="ipc",
                            learner_gpu=0.5, rollout_gpu=0.4, teacher_gpu=0.1),
    "2-colocated-ipc": dict(gpus=2, placement="colocated", learners=2, rollouts=2, sync="ipc",
                            learner_gpu=0.5, rollout_gpu=0.4, teacher_gpu=0.1),
    "2-split": dict(gpus=2, placement="split", learners=1, rollouts=1, sync="nccl",
                    learner_gpu=1, rollout_gpu=0.6, teacher_gpu=0.4),
}  # fmt: skip
PCIE_BYTES_S = 64e9  # PCIe Gen5 x16, one direction (datasheet): the colocated folder's link


def write_prompts(path: str, n: int, words: int, seed: int = 0) -> None:
    """`n` prompts of about `words` words each (the tiny tokenizer's own vocabulary)."""
    from opd.models.tiny import synthetic_corpus

    lines = synthetic_corpus(n * 8, seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(lines[i * 8 : (i + 1) * 8]).split()[:words]
            f.write(json.dumps({"id": f"p{i}", "question": " ".join(text)}) + "\n")


def overrides(args, layout: str, root: str, cuda: bool) -> list[str]:
    lay = LAYOUTS[layout]
    dtype = "bfloat16" if cuda else "float32"
    out = [
        f"run.output_dir={run_dir(args, layout, root)}",
        "run.progress=false",
        f"student.path={root}/student",
        f"teacher.path={root}/teacher",
        f"data.train_path={root}/prompts.jsonl",
        "data.id_field=id",
        "data.max_prompt_tokens=512",
        f"trainer.steps={args.steps}",
        "eval.every=0",
        "eval.heldout_prompts=1",
        "checkpoint.every=0",
        "checkpoint.export_student=false",
        f"rollout.prompts_per_step={args.prompts_per_gpu * lay['gpus']}",
        f"rollout.samples_per_prompt={args.samples_per_prompt}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"rollout.max_staleness={args.max_staleness}",
        f"rollout.sleep={str(not args.vllm_awake).lower()}",
        f"rollout.max_model_len={args.new_tokens + 512}",
        f"rollout.num_workers={lay['rollouts']}",
        f"rollout.dtype={dtype}",
        f"rollout.weight_sync={lay['sync'] if cuda else 'dir'}",
        f"learner.num_workers={lay['learners']}",
        f"learner.zero_stage={args.zero}",
        f"learner.dtype={dtype}",
        f"learner.micro_batch_size={args.micro}",
        f"teacher.dtype={dtype}",
        "teacher.token_budget=65536",
        "teacher.logprob_chunk_tokens=2048",
        "objective.name=reverse_kl",
        f"objective.params.estimator={args.estimator}",
        f"cluster.placement={lay['placement']}",
        "cluster.timeout_s=900",
    ]
    if args.lr is not None:  # else the recipe's
        out.append(f"learner.lr={args.lr}")
    if args.lora_rank:  # LoRA adapters: a push is the adapter folder (rollout.weight_sync dir)
        out += [f"learner.lora.rank={args.lora_rank}", "rollout.weight_sync=auto"]
    if cuda:
        out += [
            f"learner.num_gpus={lay['learner_gpu']}",
            f"rollout.num_gpus={lay['rollout_gpu']}",
            f"teacher.num_gpus={lay['teacher_gpu']}",
            "rollout.gpu_memory_utilization=0.3",
            f"rollout.kv_cache_memory_bytes={int(args.kv_cache_gib * 2**30)}",
        ]
        if args.vllm_compile == "decode-graphs":  # no torch.compile pass; graphs for decode
            out += [
                "rollout.enforce_eager=false",
                "rollout.compilation_config={mode: 0, cudagraph_mode: FULL_DECODE_ONLY}",
            ]  # else opd's GPU default: vLLM's own compile and CUDA-graph settings
    return out


def run_dir(args, layout: str, root: str) -> str:
    """The run's folder: one per layout, estimator and staleness."""
    return (
        f"{root}/run-{layout}-{args.estimator}"
        + (f"-async{args.max_staleness}" if args.max_staleness else "")
        + (f"-lora{args.lora_rank}" if args.lora_rank else "")
    )


def run_layout(args, layout: str, root: str, cuda: bool) -> dict:
    cmd = [sys.executable, "-m", "opd.cli", "train", args.recipe]
    cmd += overrides(args, layout, root, cuda)
    t0 = time.perf_counter()
    run = run_dir(args, layout, root)
    log_path = f"{run}.log"
    with open(log_path, "w") as log:
        # its own session: a run past the timeout is killed with its Ray processes
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = f"timeout after {args.timeout:.0f} s"
    wall = time.perf_counter() - t0
    if code != 0:
        with open(log_path) as f:
            print(f"-- {layout}: last lines of {log_path}", f.read()[-12000:], sep="\n")
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True)  # fmt: skip
        return {"layout": layout, "error": f"exit {code}", "wall_s": round(wall, 1)}
    with open(log_path) as f:  # start-up messages and warnings, for the record
        print(f"-- {layout}: last lines of {log_path}", f.read()[-3000:], sep="\n")
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    steps = [r for r in rows if "time/step" in r][1:]  # step 1 is warm-up
    if not steps:
        return {"layout": layout, "error": "no timed steps after the first"}

    def med(key: str) -> float | None:
        vals = [r[key] for r in steps if key in r]
        return round(statistics.median(vals), 4) if vals else None

    lay = LAYOUTS[layout]
    tokens = statistics.median(r["rollout/completion_tokens"] * r["rollout/samples"] for r in steps)
    result = {
        "layout": layout,
        "gpus": lay["gpus"] if cuda else 0,
        "placement": lay["placement"],
        "learner_ranks": lay["learners"],
        "rollout_workers": lay["rollouts"],
        "weight_sync": "dir" if args.lora_rank or not cuda else lay["sync"],
        "lora_rank": args.lora_rank,
        "zero_stage": args.zero,
        "estimator": args.estimator,
        "max_staleness": args.max_staleness,
        "vllm_sleeps": cuda and lay["placement"] == "colocated" and not args.vllm_awake,
        # DeepSpeed bf16 keeps fp32 master weights and moments at every ZeRO stage
        "optimizer": f"DeepSpeed ZeRO-{args.zero} torch AdamW"
        + (" (fused), bf16 weights, fp32 master weights and moments" if cuda else ", fp32"),
        "steps_timed": len(steps),
        "completion_tokens_per_step": tokens,
        "step_s": med("time/step"),
        **{f"{k}_s": med(f"time/{k}") for k in ("rollout", "teacher", "learn", "sync")},
        "completion_tokens_per_s": round(tokens / med("time/step"), 1),
        # inside the phases above: vLLM's sleep (teacher) and wake-up (sync), and the sync's
        # export (learner -> folder) and load (folder -> vLLM) or broadcast
        **{
            k.replace("/", "_").removesuffix("_s") + "_s": med(k)
            for k in (
                "time/rollout_worker",
                "time/sleep",
                "time/wake_up",
                "sync/export_s",
                "sync/load_s",
                "sync/broadcast_s",
            )
            if med(k) is not None
        },
        "sync_bytes": med("sync/bytes"),
        "wall_s": round(wall, 1),
    }
    if cuda and result["sync_bytes"] and result["sync_s"]:
        from common import hbm_bandwidth, nvlink_bandwidth

        name = torch.cuda.get_device_name(0)
        # the folder crosses PCIe twice (device -> host, host -> device); CUDA IPC is one copy
        # on the device, each byte read and written through HBM
        link = {"nccl": nvlink_bandwidth(name), "dir": PCIE_BYTES_S / 2}.get(result["weight_sync"])
        if result["weight_sync"] == "ipc" and hbm_bandwidth(name):
            link = hbm_bandwidth(name) / 2
        if link:
            floor = result["sync_bytes"] / link
            result["sync_floor_s"] = round(floor, 5)
            result["sync_fraction_of_floor"] = round(floor / result["sync_s"], 4)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="student-0.6b")
    ap.add_argument("--teacher", choices=sorted(SHAPES), default="teacher-1.8b")
    ap.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts-per-gpu", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument(
        "--vllm-compile",
        choices=["default", "decode-graphs"],
        default="default",
        help="default: opd's GPU default (vLLM's compile and CUDA graphs); decode-graphs: no "
        "torch.compile, CUDA graphs for decode only (what earlier runs used)",
    )
    ap.add_argument("--vllm-awake", action="store_true",
                    help="rollout.sleep=false: vLLM keeps its memory between steps (as TRL's "
                    "colocated vLLM does by default)")  # fmt: skip
    ap.add_argument("--max-staleness", type=int, default=0,
                    help="rollout.max_staleness: batches generated this many steps ahead "
                    "(colocated: with --vllm-awake, beside the learner)")  # fmt: skip
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--estimator", choices=("sampled", "topk", "full"), default="sampled",
                    help="objective.params.estimator of reverse_kl")  # fmt: skip
    ap.add_argument("--lr", type=float, default=None, help="learner.lr (default: the recipe's)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="learner.lora.rank: train LoRA adapters, sync only them")  # fmt: skip
    ap.add_argument("--kv-cache-gib", type=float, default=8, help="rollout KV cache (GPU)")
    ap.add_argument("--root", help="folder with student/, teacher/, prompts.jsonl to use "
                    "(built where missing; default: a new temporary folder)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--recipe", default=os.path.join(os.path.dirname(__file__), "..", "recipes",
                                                      "reverse_kl", "tiny.yaml"))  # fmt: skip
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    layouts = args.layouts or [k for k, v in LAYOUTS.items() if not cuda or v["gpus"] <= n_gpus]
    root = args.root or tempfile.mkdtemp(prefix="opd-layouts-")
    dtype = "bfloat16" if cuda else "float32"
    params = {}
    for role, shape, seed in (("student", args.size, 0), ("teacher", args.teacher, 1)):
        if os.path.exists(f"{root}/{role}/config.json"):  # built by the caller (same shape)
            params[role] = param_counts(SHAPES[shape])["total"]
        else:
            params[role] = build_folder(shape, f"{root}/{role}", dtype, seed=seed)
    n_student, n_teacher = params["student"], params["teacher"]
    if not os.path.exists(f"{root}/prompts.jsonl"):
        write_prompts(f"{root}/prompts.jsonl", args.prompts_per_gpu * max(1, n_gpus)
                      * args.steps + 8, args.prompt_words)  # fmt: skip
    if cuda:
        torch.cuda.empty_cache()
    sizes = {
        "benchmark": "train_layouts",
        "student": args.size,
        "student_params": n_student,
        "teacher": args.teacher,
        "teacher_params": n_teacher,
        "prompts_per_gpu": args.prompts_per_gpu,
        "samples_per_prompt": args.samples_per_prompt,
        "new_tokens": args.new_tokens,
        "micro_batch": args.micro,
        "lr": args.lr if args.lr is not None else "recipe's",
    }
    results = {}
    for layout in layouts:
        results[layout] = run_layout(args, layout, root, cuda)
        report({**sizes, **results[layout]})
    base = results.get("1-colocated", {}).get("completion_tokens_per_s")
    for layout, r in results.items():
        if base and r.get("completion_tokens_per_s") and r["gpus"] > 1:
            eff = r["completion_tokens_per_s"] / (r["gpus"] * base)
            report({**sizes, "layout": layout, "scaling_efficiency_vs_1gpu": round(eff, 3)})
    print(json.dumps({"environment": environment()}))


if __name__ == "__main__":
    main()
