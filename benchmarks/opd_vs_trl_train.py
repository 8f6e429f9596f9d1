"""`opd train` against TRL's fastest on-policy distillation trainer on the same work, in one
invocation, each system in a process of its own, one after the other (issue #17).

    python benchmarks/opd_vs_trl_train.py --workload S --out /tmp/opd-vs-trl-S     # one H200
    python benchmarks/opd_vs_trl_train.py --workload L --root /tmp/ovt-L --build-only
    python benchmarks/opd_vs_trl_train.py --workload L --root /tmp/ovt-L --rows opd-full \
        --out /tmp/L                          # a row a call where a call has a time limit
    python benchmarks/opd_vs_trl_train.py --render /tmp/L.jsonl --out /tmp/L       # table again
    python benchmarks/opd_vs_trl_train.py --workload tiny --rows trl-distill trl-gkd  # CPU smoke

Rows (`--rows`, in this order by default):
- `opd-full`: `opd train` through `train_layouts.py` (layout `--layout`, default
  `1-colocated-ipc`: learner, vLLM and teacher on one GPU, weights over CUDA IPC; DeepSpeed
  ZeRO `--zero`), objective `reverse_kl` with estimator `full`: the reverse KL over the whole
  vocabulary, the teacher's full logits against the learner's (the teacher sends its final
  hidden states, `teacher.full_transport: auto`); vLLM stays awake between steps
  (`rollout.sleep: false`, as TRL's colocated vLLM) unless `--opd-sleep`;
- `opd-sampled`: the same with estimator `sampled` (the teacher scores the sampled token
  only; a different, cheaper estimator of the same divergence: an extra row, not the match);
- `opd-full-async`, `opd-sampled-async`: the same with `rollout.max_staleness: 1`: vLLM
  (awake) generates the next step's batch beside the teacher and learner, from weights one
  update older (an extra row: not the same work as TRL's synchronous step);
- `trl-distill`: `trl_distill.py`, TRL's `DistillationTrainer` with `use_vllm=True,
  vllm_mode="colocate"` on the same GPU (on CPU: HF `generate`), beta 1 (full-vocabulary
  reverse KL);
- `trl-gkd`: `trl_distill.py --mode gkd`, TRL's `GKDTrainer` (HF `generate`), the slow
  baseline; by default only where cheap (workloads S and tiny).

Workloads (`--workload`; every number can be overridden by its flag):
- `S`: 8 prompts x 1 sample, 128-word prompts, 256 new tokens, student `student-0.6b`
  (Qwen2-0.5B shape), teacher `teacher-1.8b` (Qwen2.5-1.5B shape, untied head);
- `L`: 64 prompts x 4 samples, 128-word prompts, 1,024 new tokens, student `qwen2.5-1.5b`,
  teacher `teacher-7b` (Qwen2.5-7B shape with the student's 151,936-row vocabulary);
  micro-batch 8 on both sides (TRL's default fp32 student under autocast, beside a vLLM that
  keeps 30 % of the GPU, would need about 60 GB of activations at 16: estimated, not measured);
- `tiny`: the CPU smoke (tiny shapes, 4 prompts x 2 samples, 8 new tokens).

Same for every row: the model folders and the prompt file (built once, by a child process, under
`--root`), prompts per step, samples per prompt, new tokens (temperature 1), learning rate
(constant), micro-batch (`--micro`; TRL's `per_device_train_batch_size`, gradient accumulation
over the rest of the step; TRL falls back to the next of `--trl-micro` only after running out
of GPU memory, and the row says which ran), steps; the loss is summed over completion tokens
and divided by the step's completion tokens on both sides. Optimizer precision is stated per
row. s/step is the median over steps 2..N of each system's own step clock (opd's
`time/step` from metrics.jsonl; TRL's optimizer step from a TrainerCallback); completion tokens
are counted from what each sampler returned. The weight sync is set against its floor where
`train_layouts.py` computes one (CUDA IPC: 2 bytes moved per byte of weights, at HBM speed).

Writes PREFIX.jsonl (one line per row, appended) and PREFIX.md (the table of every row in
PREFIX.jsonl, the latest line per row, then the raw lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = ("opd-full", "opd-sampled", "opd-full-async", "opd-sampled-async", "trl-distill", "trl-gkd")
WORKLOADS = {
    "S": dict(student="student-0.6b", teacher="teacher-1.8b", prompts=8, samples=1,
              prompt_words=128, new_tokens=256, micro=8, trl_micro=[8, 4], steps=6,
              kv_cache_gib=8, rows=list(ROWS)),
    "L": dict(student="qwen2.5-1.5b", teacher="teacher-7b", prompts=64, samples=4,
              prompt_words=128, new_tokens=1024, micro=8, trl_micro=[8, 4], steps=4,
              kv_cache_gib=16, rows=["opd-full", "opd-sampled", "trl-distill"]),
    "tiny": dict(student="tiny", teacher="tiny-teacher", prompts=4, samples=2, prompt_words=8,
                 new_tokens=8, micro=4, trl_micro=[4], steps=3, kv_cache_gib=1,
                 rows=list(ROWS)),
}  # fmt: skip
VERSIONS = ("python", "torch", "transformers", "deepspeed", "vllm", "trl", "ray")
OOM = ("OutOfMemoryError", "CUDA out of memory")


def build(args) -> None:
    """(Child process) the student and teacher folders and the prompt file under args.root,
    unless the same ones are there already (a later call of a session with the same --root)."""
    import torch

    sys.path.insert(0, HERE)
    from common import build_folder
    from train_layouts import write_prompts

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    n = args.prompts * (args.steps + 1) + 8
    spec = dict(student=args.student, teacher=args.teacher, prompts=n, words=args.prompt_words,
                dtype=dtype)  # fmt: skip
    marker = os.path.join(args.root, "built.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                print(f"reusing the folders and prompts under {args.root}", flush=True)
                return
    build_folder(args.student, os.path.join(args.root, "student"), dtype, seed=0)
    build_folder(args.teacher, os.path.join(args.root, "teacher"), dtype, seed=1)
    write_prompts(os.path.join(args.root, "prompts.jsonl"), n, args.prompt_words)
    with open(marker, "w") as f:
        json.dump(spec, f)


RUNNING: list[tuple[subprocess.Popen, bool]] = []  # the row's process (and if it runs Ray)


def kill(proc: subprocess.Popen, ray: bool) -> None:
    """End a row's process group, and for an `opd train` row the Ray it started (`opd train`
    runs in a session of its own under train_layouts.py; its actors hold the GPU)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if ray:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True)  # fmt: skip


def stop(signum, frame) -> None:
    """SIGTERM / SIGINT (e.g. an outer `timeout`): the running row must not outlive us."""
    for proc, ray in RUNNING:
        kill(proc, ray)
    sys.exit(128 + signum)


def run_child(cmd: list[str], log_path: str, timeout: float, ray: bool) -> tuple[int | str, str]:
    """Run `cmd` in a session of its own (killed whole past `timeout`); (exit code, output)."""
    print("$", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.append((proc, ray))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc, ray)
            code = f"timeout after {timeout:.0f} s"
        finally:
            RUNNING.remove((proc, ray))
    with open(log_path) as f:
        out = f.read()
    print(f"-- last lines of {log_path}", out[-4000:], sep="\n", flush=True)
    return code, out


def failure(code: int | str, found: list) -> str:
    why = f"exit {code}" if isinstance(code, int) else code
    return why + ("" if found else ", no result line")


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def shared_flags(args) -> list[str]:
    return ["--size", args.student, "--teacher", args.teacher, "--steps", str(args.steps),
            "--samples-per-prompt", str(args.samples), "--new-tokens", str(args.new_tokens),
            "--prompt-words", str(args.prompt_words), "--lr", str(args.lr),
            "--root", args.root]  # fmt: skip


def run_opd(args, row: str) -> dict:
    estimator = row.removeprefix("opd-").removesuffix("-async")
    staleness = 1 if row.endswith("-async") else 0
    cmd = [sys.executable, os.path.join(HERE, "train_layouts.py"), *shared_flags(args),
           "--layouts", args.layout, "--estimator", estimator, "--zero", str(args.zero),
           "--prompts-per-gpu", str(args.prompts), "--micro", str(args.micro),
           "--kv-cache-gib", str(args.kv_cache_gib), "--max-staleness", str(staleness),
           "--timeout", str(max(60, args.row_timeout - 30))]  # fmt: skip
    if not args.opd_sleep:  # awake between steps, as TRL's colocated vLLM (rollout.sleep=false)
        cmd.append("--vllm-awake")
    code, out = run_child(cmd, os.path.join(args.root, f"{row}.log"), args.row_timeout, ray=True)
    # the final checkpoint `opd train` always writes (tens of GB at workload L: weights, fp32
    # masters and moments) would fill the disk before the next row
    async_part = f"-async{staleness}" if staleness else ""
    ckpt = os.path.join(args.root, f"run-{args.layout}-{estimator}{async_part}", "checkpoints")
    shutil.rmtree(ckpt, ignore_errors=True)
    found = [r for r in json_lines(out) if r.get("benchmark") == "train_layouts" and "layout" in r]
    if code != 0 or not found:
        return {"error": failure(code, found)}
    r = found[0]
    return {
        **r,
        "system": f"opd train ({r['layout']})",
        "loss": f"reverse KL, estimator {estimator}"
        + (" (full vocabulary)" if estimator == "full" else " (sampled token)")
        + (", batches one step ahead (rollout.max_staleness 1)" if staleness else ""),
        "generate_s": r.get("rollout_s"),
    }


def run_trl(args, row: str) -> dict:
    cuda = args.cuda
    mode = "gkd" if row == "trl-gkd" else "distill"
    vllm = "colocate" if mode == "distill" and cuda else "none"
    tries = []
    for micro in args.trl_micro:
        cmd = [sys.executable, os.path.join(HERE, "trl_distill.py"), *shared_flags(args),
               "--prompts", str(args.prompts), "--mode", mode, "--vllm", vllm,
               "--vllm-gpu-util", str(args.vllm_gpu_util), "--micro", str(micro),
               "--student-dtype", args.trl_student_dtype]  # fmt: skip
        if args.trl_grad_ckpt:
            cmd.append("--grad-ckpt")
        log = os.path.join(args.root, f"{row}-micro{micro}.log")
        code, out = run_child(cmd, log, args.row_timeout, ray=False)
        found = [r for r in json_lines(out) if r.get("benchmark") == "trl_distill"]
        if code == 0 and found:
            return {**found[0], "micro_batch_tries": tries + [micro]}
        tries.append(micro)
        if not any(s in out for s in OOM):
            return {"error": failure(code, found), "micro_batch_tries": tries}
    return {"error": "out of GPU memory at every --trl-micro", "micro_batch_tries": tries}


# -- the table ---------------------------------------------------------------------------------


def _num(x, digits=3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def render(lines: list[dict]) -> str:
    """Markdown: what was run, then one row per system (the latest line of each)."""
    latest: dict[str, dict] = {}
    for r in lines:
        latest[r["row"]] = r
    rows = [latest[k] for k in ROWS if k in latest]
    if not rows:
        return "no rows\n"
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else rows[0]
    # each row's process reports the packages it imported: the union of them
    found = {k: r[k] for r in reversed(rows) for k in VERSIONS if k in r}
    versions = ", ".join(f"{k} {found[k]}" for k in VERSIONS if k in found)
    out = [
        f"Workload {first.get('workload')}: student {first.get('student')} "
        f"({_num(first.get('student_params'))} parameters), teacher {first.get('teacher')} "
        f"({_num(first.get('teacher_params'))}); {first.get('prompts')} prompts x "
        f"{first.get('samples')} samples per step, {first.get('prompt_words')}-word prompts, "
        f"{first.get('new_tokens')} new tokens, lr {first.get('lr')} (constant), "
        f"{first.get('steps')} steps, medians over steps 2..N. Every loss is summed over "
        "completion tokens and divided by the step's completion tokens.",
        f"Device: {first.get('device', '?')}; {versions}.",
        "",
        "| row | system | loss | optimizer | micro-batch | s/step | rollout s | teacher s "
        "| learn s | sync s (floor) | completion tokens/step | completion tokens/s "
        "| TRL Distillation s/step / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = latest.get("trl-distill", {}).get("step_s")
    for r in rows:
        if "error" in r:
            out.append(f"| {r['row']} | {r.get('system', '')} | | | | {r['error']} |" + " |" * 7)
            continue
        sync = _num(r.get("sync_s"))
        if r.get("sync_floor_s") is not None:
            sync += f" ({_num(r['sync_floor_s'], 4)})"
        teacher = _num(r.get("teacher_s"))
        if r.get("learn_includes_teacher"):
            teacher = "in learn"
        speed = f"{base / r['step_s']:.2f}x" if base and r.get("step_s") else ""
        out.append(
            f"| {r['row']} | {r.get('system', '')} | {r.get('loss', '')} "
            f"| {r.get('optimizer', '')} | {r.get('micro_batch', '')} | {_num(r.get('step_s'))} "
            f"| {_num(r.get('generate_s'))} | {teacher} | {_num(r.get('learn_s'))} | {sync} "
            f"| {_num(r.get('completion_tokens_per_step'), 1)} "
            f"| {_num(r.get('completion_tokens_per_s'), 1)} | {speed} |"
        )
    out += ["", "Raw JSON lines:", "", "```"]
    out += [json.dumps(r) for r in rows] + ["```", ""]
    return "\n".join(out)


def write_outputs(prefix: str, new: list[dict]) -> None:
    prefix = prefix.removesuffix(".md").removesuffix(".jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".jsonl", "a") as f:
        for r in new:
            f.write(json.dumps(r) + "\n")
    with open(prefix + ".jsonl") as f:
        lines = json_lines(f.read())
    with open(prefix + ".md", "w") as f:
        f.write(render(lines))
    print(f"wrote {prefix}.jsonl, {prefix}.md", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="S")
    ap.add_argument("--rows", nargs="+", choices=ROWS, help="default: the workload's")
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--prompts", type=int, help="prompts per step")
    ap.add_argument("--samples", type=int, help="samples per prompt")
    ap.add_argument("--prompt-words", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--micro", type=int, help="micro-batch (opd learner; TRL's first try)")
    ap.add_argument(
        "--trl-micro",
        type=int,
        nargs="+",
        help="TRL's micro-batches, tried in "
        "order while it runs out of GPU memory (default: the workload's, or --micro)",
    )
    ap.add_argument("--steps", type=int)
    ap.add_argument("--kv-cache-gib", type=float, help="opd's vLLM KV cache")
    ap.add_argument("--opd-sleep", action="store_true",
                    help="opd's vLLM sleeps while the teacher and learner run (opd's "
                    "default, rollout.sleep=true); else it stays awake, as TRL's")  # fmt: skip
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--layout", default="1-colocated-ipc")
    ap.add_argument("--zero", type=int, default=2, help="opd learner's ZeRO stage")
    ap.add_argument("--vllm-gpu-util", type=float, default=0.3, help="TRL's colocated vLLM")
    ap.add_argument("--trl-student-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="float32: TRL's default (fp32 weights and AdamW under bf16 autocast); "
                    "bfloat16: AdamW on bf16 weights, no fp32 copy")  # fmt: skip
    ap.add_argument("--trl-grad-ckpt", action="store_true")
    ap.add_argument("--row-timeout", type=float, default=540, help="seconds per row process")
    ap.add_argument("--root", help="where the folders are built (default: a new temp folder)")
    ap.add_argument("--out", help="PREFIX: writes PREFIX.jsonl (appended) and PREFIX.md")
    ap.add_argument("--render", help="a .jsonl of earlier rows: write its table and stop")
    ap.add_argument("--build-only", action="store_true", help="build the folders under --root "
                    "and stop (a later call with the same --root reuses them)")  # fmt: skip
    ap.add_argument("--child-build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.render:
        with open(args.render) as f:
            lines = json_lines(f.read())
        if args.out:
            with open(args.out.removesuffix(".md") + ".md", "w") as f:
                f.write(render(lines))
        print(render(lines))
        return
    if args.micro is not None and args.trl_micro is None:
        args.trl_micro = [args.micro]
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.child_build:
        build(args)
        return
    if args.build_only:
        args.rows = []
    if (args.prompts * args.samples) % args.micro:
        raise SystemExit(f"--micro {args.micro} does not divide {args.prompts * args.samples}")
    args.root = args.root or tempfile.mkdtemp(prefix="opd-vs-trl-")
    os.makedirs(args.root, exist_ok=True)
    # The parent never starts CUDA (a child asks): the rows get the whole device.
    probe = "import torch; print(int(torch.cuda.is_available()))"
    args.cuda = bool(int(subprocess.check_output([sys.executable, "-c", probe]).split()[-1]))
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--child-build", "--workload",
           args.workload, "--root", args.root, "--student", args.student, "--teacher",
           args.teacher, "--prompts", str(args.prompts), "--steps", str(args.steps),
           "--prompt-words", str(args.prompt_words)]  # fmt: skip
    subprocess.run(cmd, check=True)
    print(f"folders and prompts under {args.root} in {time.perf_counter() - t0:.0f} s", flush=True)

    workload = {
        "benchmark": "opd_vs_trl_train",
        "workload": args.workload,
        "prompts": args.prompts,
        "samples": args.samples,
        "prompt_words": args.prompt_words,
        "new_tokens": args.new_tokens,
        "lr": args.lr,
        "steps": args.steps,
    }
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    results = []
    for row in args.rows:
        t = time.perf_counter()
        r = run_opd(args, row) if row.startswith("opd-") else run_trl(args, row)
        r = {**r, "source": r.get("benchmark"), **workload, "row": row,
             "row_wall_s": round(time.perf_counter() - t, 1)}  # fmt: skip
        r.setdefault("student", args.student)
        r.setdefault("teacher", args.teacher)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.out:  # after every row: a run stopped later keeps the rows it finished
            write_outputs(args.out, [r])
    print(render(results), flush=True)


if __name__ == "__main__":
    main()
