"""One on-policy GKD step, TRL's GKDTrainer against opd, on the same device in one run.

    python benchmarks/opd_vs_trl.py --student tiny --teacher tiny-teacher --new-tokens 16  # CPU
    python benchmarks/opd_vs_trl.py                     # GPU: 0.63B student, 1.78B teacher

Both train a random-init Qwen2-shaped student (bf16 on GPU) against a random-init teacher on
the same 8 prompts of 128 random token ids, sampling 256 new tokens at temperature 1, fully
on-policy (lmbda 1) with reverse KL (beta 1) over the whole vocabulary:

- `trl`: `trl.experimental.gkd.GKDTrainer` (HF `generate` for the samples; student and
  teacher forward passes on the padded batch; torch AdamW through the HF Trainer);
- `opd`: opd's own roles in one process on one device: `RolloutWorker` (vLLM, engine in
  this process), `TeacherScorer` (full-vocabulary signal), `Learner` (DeepSpeed ZeRO-2 bf16,
  the `gkd` objective with estimator `full`), and the colocated weight sync (the learner's
  tensors copied into vLLM's through `reload_weights`). No Ray: the phases are the same calls
  the loop makes through its actors.

Reported: seconds per step (median of steps 2..N; step 1 is warm-up), and per phase.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_folder, environment, random_prompts, report  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def _print_profile(prof, cuda: bool) -> None:
    """The step's heaviest operators by device time and by host time (stdout)."""
    table = prof.key_averages()
    for key in (["self_cuda_time_total"] if cuda else []) + ["cpu_time_total"]:
        print(f"-- profile of step 3, sorted by {key}", flush=True)
        print(table.table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def run_trl(args, student: str, teacher: str, prompts: list[list[int]]) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=dtype)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype)

    def collate(rows):
        ids = torch.tensor([r["prompt_ids"] for r in rows])
        ones = torch.ones_like(ids)
        # The Trainer counts the loss's tokens from these labels before the on-policy samples
        # replace them (TRL's ChatML collator gives the dataset completion's): count as many
        # as will be generated.
        return {
            "input_ids": ids,
            "attention_mask": ones,
            "labels": torch.zeros(len(rows), args.new_tokens, dtype=torch.long),
            "prompts": ids,
            "prompt_attention_mask": ones,
        }

    data = Dataset.from_dict({"prompt_ids": prompts * (args.steps + 1)})
    cfg = GKDConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=len(prompts),
        max_steps=args.steps,
        learning_rate=1e-6,
        lmbda=1.0,
        beta=1.0,
        temperature=1.0,
        max_new_tokens=args.new_tokens,
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    times: dict[str, list[float]] = {"step": [], "generate": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            times["step"].append(time.perf_counter() - self.t0)

    trainer = GKDTrainer(
        model=model,
        teacher_model=teacher_model,
        args=cfg,
        train_dataset=data,
        data_collator=collate,
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    generate = trainer.generate_on_policy_outputs

    def timed_generate(*a, **k):
        _sync()
        t0 = time.perf_counter()
        out = generate(*a, **k)
        _sync()
        times["generate"].append(time.perf_counter() - t0)
        return out

    trainer.generate_on_policy_outputs = timed_generate
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step = median_after_first(times["step"])
    gen = median_after_first(times["generate"])
    del trainer, model, teacher_model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "system": "trl",
        "seconds_per_step": round(step, 4),
        "generate_s": round(gen, 4),
        "rest_s": round(step - gen, 4),
        "step_times": [round(t, 4) for t in times["step"]],
        "losses": [round(x, 4) for x in losses],
    }


def run_opd(args, student: str, teacher: str, prompts: list[list[int]]) -> dict:
    if args.vllm_mp:  # vLLM's engine core in a process of its own; weights over CUDA IPC
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the IPC handle is pickled
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: one process
    from opd.cluster.placement import free_port
    from opd.config.schema import LearnerConfig, ObjectiveConfig, RolloutConfig, TeacherConfig
    from opd.learner.worker import Learner
    from opd.objectives import build_objective
    from opd.rollout.worker import RolloutWorker
    from opd.samples import GenerationRequest, Sample, sample_seed
    from opd.teacher.scorer import TeacherScorer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"
    zero = args.zero if cuda else 0
    params = {"beta": 1.0, "lmbda": 1.0, "temperature": 1.0, "estimator": "full"}
    objective = ObjectiveConfig(name="gkd", params=params)
    request = build_objective("gkd", params, None).teacher_request()
    t_start = time.perf_counter()
    learner = Learner(
        0,
        1,
        "127.0.0.1",
        free_port(),
        student,
        LearnerConfig(
            dtype=dtype,
            micro_batch_size=len(prompts),
            zero_stage=zero,
            compile=args.learner_compile,
        ),
        objective,
        total_steps=args.steps + 1,
        grad_accum_steps=1,
        seed=0,
        device=device,
    )
    scorer = TeacherScorer(
        TeacherConfig(path=teacher, dtype=dtype, token_budget=65536, logprob_chunk_tokens=2048),
        teacher,
        device=device,
    )
    scorer.prompt_ids = lambda sample: sample.prompt_ids  # ids already
    # the scores come back on the host, as in `opd train`; the learner moves them to its device
    compilation = None
    if cuda and not args.eager:
        compilation = {"mode": args.vllm_compile_mode, "cudagraph_mode": args.cudagraph_mode}
    rollout = RolloutWorker(
        student,
        RolloutConfig(
            dtype=dtype,
            max_model_len=len(prompts[0]) + args.new_tokens + 8,
            enforce_eager=args.eager,
            gpu_memory_utilization=args.vllm_memory if cuda else None,
            kv_cache_memory_bytes=4 * 2**30 if cuda else None,  # no profiling next to others
        ),
        seed=0,
        device=device,
        compilation_config=compilation,
    )
    startup = time.perf_counter() - t_start
    phases: dict[str, list[float]] = {k: [] for k in ("rollout", "teacher", "learn", "sync")}
    steps, tokens, losses = [], [], []
    for step in range(1, args.steps + 1):
        prof = _profiler(cuda) if args.profile and step == 3 else None
        t0 = time.perf_counter()
        requests = [
            GenerationRequest(p, sample_seed(0, step, i, 0), (i, 0)) for i, p in enumerate(prompts)
        ]
        results = rollout.generate(
            requests, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0
        )
        samples = [
            Sample(
                prompt_index=i,
                sample_index=0,
                prompt_id=str(i),
                messages=[],
                prompt_ids=prompts[i],
                completion_ids=r["completion_ids"],
                logprobs=r["logprobs"],
                finish_reason=r["finish_reason"],
                policy_version=r["policy_version"],
            )
            for i, r in enumerate(results)
        ]
        t1 = time.perf_counter()
        scorer.score(samples, request)
        _sync()  # the phase owns its device work (the scores are on the host by now)
        t2 = time.perf_counter()
        losses.append(learner.train_step(samples, sum(s.n_tokens for s in samples))["train/loss"])
        t3 = time.perf_counter()
        if args.vllm_mp:
            rollout.load_weights_from_ipc(*learner.ipc_weights(dtype), step)
        else:
            named = [(n, p.detach()) for n, p in learner.model.named_parameters()]
            rollout.load_weights_from_tensors(named, step)
        _sync()
        t4 = time.perf_counter()
        if prof is not None:
            prof.__exit__(None, None, None)
            _print_profile(prof, cuda)
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[k].append(v)
        steps.append(t4 - t0)
        tokens.append(sum(s.n_tokens for s in samples))
    out = {
        "system": "opd",
        "seconds_per_step": round(median_after_first(steps), 4),
        **{f"{k}_s": round(median_after_first(v), 4) for k, v in phases.items()},
        "step_times": [round(t, 4) for t in steps],
        "completion_tokens_per_step": tokens,
        "losses": [round(x, 4) for x in losses],
        "startup_s": round(startup, 1),
        "vllm_cuda_graphs": compilation["cudagraph_mode"] if compilation else "none (eager)",
        "vllm_engine": "own process, CUDA IPC sync" if args.vllm_mp else "in-process",
        "vllm_direct_load": rollout.direct_load_applies(),
        "learner": f"zero{zero}" + (":compile" if args.learner_compile else ""),
    }
    del rollout, scorer, learner
    gc.collect()
    return out


def system_options(system: str) -> dict:
    """`trl`, `opd` or `opd:zero0:mp:compile`-style variants -> the options they set."""
    name, *opts = system.split(":")
    if name not in ("trl", "opd") or (name == "trl" and opts):
        raise SystemExit(f"--systems: {system!r} is not trl, opd or opd:OPTS")
    out = {}
    for o in opts:
        if o.startswith("zero") and o[4:] in ("0", "1", "2", "3"):
            out["zero"] = int(o[4:])
        elif o == "mp":
            out["vllm_mp"] = True
        elif o == "compile":
            out["learner_compile"] = True
        else:
            raise SystemExit(f"--systems: unknown option {o!r} in {system!r} (zeroN, mp, compile)")
    return out


def spawn(system: str, root: str) -> dict:
    """Run one system in a fresh process (what one leaves behind in a process, allocator
    state, threads, objects, cannot slow the next) and return its result line."""
    import json
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", system]
    cmd += ["--root", root]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"child_result"')]
    print(proc.stdout, flush=True)  # the child's own log lines and profiles
    if proc.returncode or not lines:
        return {"system": system, "error": f"exit code {proc.returncode}, no result"}
    return json.loads(lines[-1])["child_result"]


def run_child(args, student: str, teacher: str) -> None:
    import json

    for key, value in system_options(args.child).items():
        setattr(args, key, value)
    vocab = SHAPES[args.student]["vocab_size"]
    prompts = random_prompts(args.prompts, args.prompt_len, vocab)
    if args.child == "trl":
        out = run_trl(args, student, teacher, prompts)
        import trl  # noqa: F401  (its version goes into the report)
    else:
        out = run_opd(args, student, teacher, prompts)
    out["system"] = args.child
    out["versions"] = environment()
    print(json.dumps({"child_result": out}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", choices=sorted(SHAPES), default="student-0.6b")
    ap.add_argument("--teacher", choices=sorted(SHAPES), default="teacher-1.8b")
    ap.add_argument(
        "--systems",
        nargs="+",
        default=["trl", "opd"],
        help="trl, opd, or opd:OPTS with OPTS among zeroN, mp, compile joined by ':' (e.g. "
        "opd:zero0:mp); each runs in a process of its own, one after the other",
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    ap.add_argument("--cudagraph-mode", default="FULL_DECODE_ONLY")
    ap.add_argument("--vllm-memory", type=float, default=0.3)
    ap.add_argument("--vllm-compile-mode", type=int, default=0, help="vLLM compilation mode")
    ap.add_argument("--zero", type=int, default=2, help="opd learner's ZeRO stage (GPU)")
    ap.add_argument("--profile", action="store_true", help="profile opd's step 3 per phase")
    ap.add_argument("--learner-compile", action="store_true", help="compile the learner's layers")
    ap.add_argument(
        "--vllm-mp",
        action="store_true",
        help="vLLM's engine core in its own process, weights synced over CUDA IPC (GPU)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one system, folders already built
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for system in args.systems:
        system_options(system)  # a misspelt system fails before anything is built

    root = args.root or tempfile.mkdtemp()
    student, teacher = os.path.join(root, "student"), os.path.join(root, "teacher")
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.child:
        run_child(args, student, teacher)
        return
    n_student = build_folder(args.student, student, dtype, seed=0)
    n_teacher = build_folder(args.teacher, teacher, dtype, seed=1)
    sizes = {
        "student": args.student,
        "student_params": n_student,
        "teacher": args.teacher,
        "teacher_params": n_teacher,
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "steps": args.steps,
    }
    results = {}
    for system in args.systems:
        r = results[system] = spawn(system, root)
        report({"benchmark": "opd_vs_trl", **sizes, **r.pop("versions", {}), **r})
    for system in [x for x in results if x != "trl"]:
        if "trl" in results and "error" not in results["trl"] and "error" not in results[system]:
            speedup = results["trl"]["seconds_per_step"] / results[system]["seconds_per_step"]
            report(
                {"benchmark": "opd_vs_trl", **sizes, "system": system, "speedup": round(speedup, 2)}
            )


if __name__ == "__main__":
    main()
