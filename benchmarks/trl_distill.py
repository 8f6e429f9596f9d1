"""TRL's on-policy distillation trainers on the work that `opd train` does (issue #17): one
configuration per process, one JSON line.

    python benchmarks/trl_distill.py --vllm colocate          # GPU: TRL DistillationTrainer
    python benchmarks/trl_distill.py --mode gkd --vllm none   # GPU: TRL GKDTrainer (HF generate)
    python benchmarks/trl_distill.py --size tiny --teacher tiny-teacher --vllm none --steps 2 \
        --prompts 4 --new-tokens 8 --prompt-words 8           # CPU smoke (no vLLM)

`--mode distill` is TRL 1.16.0's `trl.DistillationTrainer` / `trl.DistillationConfig` (the
stable API; `trl.experimental.distillation` only re-exports it with a deprecation warning):
always on-policy (one completion per dataset row; no `lmbda`), the generalized JSD with
`beta=1`, i.e. the reverse KL KL(student || teacher) over the whole vocabulary, computed by
its chunked kernel from both models' final hidden states and LM heads, summed over completion
tokens and divided by the step's completion-token count (as opd's `tokens` normalization).
With `--vllm colocate` the student samples through a vLLM engine in the trainer's process on
the same GPU (TRL's `VLLMGeneration`: vLLM's default compilation, TRL's
`max_num_batched_tokens=4096`, weights pushed parameter by parameter through the model's
`load_weights` once per optimizer step, no sleep unless `--vllm-sleep`). `--vllm none`
samples with HF `generate` (the CPU smoke). `--vllm server` expects a `trl vllm-serve` of the
student already running on another GPU at `--vllm-server-url` (two GPUs: not the one-GPU
comparison; not run by `opd_vs_trl_train.py`).

`--mode gkd` is `trl.experimental.gkd.GKDTrainer` (HF `generate`, full logits of both models,
lmbda 1, beta 1): the slow baseline, on the same prompts.

Work, as `train_layouts.py` gives `opd train`: random-init Qwen2 shapes from `common.SHAPES`
built by `common.build_folder` (or the folders under `--root`), the prompt file that
`train_layouts.write_prompts` writes, each prompt shown as a one-turn conversation under the
folder's chat template (what opd renders), `--samples-per-prompt` copies of each prompt next to
each other in the batch (TRL samples once per row), `--prompts` prompts per optimizer step,
`--new-tokens` at temperature 1, top-p 1, no top-k. Optimizer: the HF Trainer's AdamW, lr
constant (no warm-up, no decay: opd's `constant`), weight decay 0, gradient clipping at 1.0.
Precision (`--student-dtype`): `float32` (TRL's default when the student is given as a path)
trains fp32 weights under bf16 autocast, so AdamW updates fp32 weights with fp32 moments, the
optimizer precision of opd's DeepSpeed bf16 (bf16 weights, fp32 master copy); `bfloat16` runs
AdamW on the bf16 weights themselves (no fp32 copy). The teacher is bf16 on GPU.

Timing: a TrainerCallback takes each optimizer step's wall time from `on_step_begin` to
`on_step_end`, the device synchronized at both ends (the HF Trainer fetches the step's batches
just before `on_step_begin` and logs just after `on_step_end`; `interval_s` is the time from one
step's end to the next, those included). Inside the step: the sampling call
(`_generate_single_turn`, or GKD's `generate_on_policy_outputs`), vLLM's weight push
(`sync_weights`) and the teacher's forward passes are timed by wrapping those methods on the
trainer, the device synchronized around each; `learn_s` is the rest (student forward and
backward, loss, optimizer). Medians over steps 2..N (step 1 is warm-up). Completion tokens
are counted from what the sampler returned (random-init models with a 151,936-token vocabulary
rarely emit the EOS id, so nearly every completion runs to `--new-tokens`; counted, not assumed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_folder, param_counts, report  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_after_first(xs: list[float]) -> float | None:
    xs = xs[1:] if len(xs) > 1 else xs
    return round(statistics.median(xs), 4) if xs else None


def prepare_root(args, root: str, cuda: bool) -> tuple[int, int]:
    """Student and teacher folders and the prompt file under `root`, built where missing;
    returns the parameter counts."""
    from train_layouts import write_prompts

    dtype = "bfloat16" if cuda else "float32"
    counts = []
    for name, shape, seed in (("student", args.size, 0), ("teacher", args.teacher, 1)):
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            build_folder(shape, folder, dtype, seed=seed)
        counts.append(param_counts(SHAPES[shape])["total"])
    path = os.path.join(root, "prompts.jsonl")
    if not os.path.exists(path):
        write_prompts(path, args.prompts * (args.steps + 1) + 8, args.prompt_words)
    if cuda:
        torch.cuda.empty_cache()
    return counts[0], counts[1]


def read_questions(path: str, n: int) -> list[str]:
    """The first `n` questions of the prompt file (cycled if it holds fewer)."""
    with open(path) as f:
        qs = [json.loads(line)["question"] for line in f if line.strip()]
    return [qs[i % len(qs)] for i in range(n)]


class StepTimes:
    """Per optimizer step: wall time, and the phases the wrappers below add into."""

    def __init__(self) -> None:
        self.step: list[float] = []
        self.interval: list[float] = []
        self.phases: dict[str, list[float]] = {"generate": [], "sync": [], "teacher": []}
        self.tokens: list[int] = []
        self._open: dict[str, float] = {}
        self._open_tokens = 0
        self._t0 = self._last_end = None

    def begin(self) -> None:
        _sync()
        self._t0 = time.perf_counter()
        self._open = {k: 0.0 for k in self.phases}
        self._open_tokens = 0

    def end(self) -> None:
        _sync()
        now = time.perf_counter()
        self.step.append(now - self._t0)
        if self._last_end is not None:
            self.interval.append(now - self._last_end)
        self._last_end = now
        for k, v in self._open.items():
            self.phases[k].append(v)
        self.tokens.append(self._open_tokens)

    def timed(self, phase: str, fn, *a, **k):
        _sync()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        _sync()
        self._open[phase] = self._open.get(phase, 0.0) + time.perf_counter() - t0
        return out

    def current(self, phase: str) -> float:
        return self._open.get(phase, 0.0)

    def discount(self, phase: str, seconds: float) -> None:
        """`seconds` of `phase` went to a phase inside it, timed on its own: count them once."""
        self._open[phase] -= seconds

    def count(self, n: int) -> None:
        self._open_tokens += n


def callback(times: StepTimes):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.begin()

        def on_step_end(self, *a, **k):
            times.end()

    return StepTimer()


def common_config(args, cuda: bool, batch: int) -> dict:
    """TrainingArguments fields both trainers get (HF Trainer level)."""
    if batch % args.micro:
        raise SystemExit(f"--micro {args.micro} does not divide the {batch} sequences per step")
    return dict(
        output_dir=tempfile.mkdtemp(prefix="trl-distill-"),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=batch // args.micro,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        beta=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=args.grad_ckpt,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def run_distill(args, root: str, cuda: bool, times: StepTimes):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    batch = args.prompts * args.samples_per_prompt
    questions = read_questions(os.path.join(root, "prompts.jsonl"), args.prompts * args.steps)
    rows = [
        {"prompt": [{"role": "user", "content": q}]}
        for q in questions
        for _ in range(args.samples_per_prompt)
    ]
    use_vllm = args.vllm != "none"
    cfg = DistillationConfig(
        **common_config(args, cuda, batch),
        model_init_kwargs={"dtype": args.student_dtype},
        teacher_model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
        max_completion_length=args.new_tokens,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,  # a prompt's copies stay in one step, as opd's samples do
        use_vllm=use_vllm,
        vllm_mode="server" if args.vllm == "server" else "colocate",
        vllm_gpu_memory_utilization=args.vllm_gpu_util,
        vllm_max_model_length=args.new_tokens + 512,  # opd's rollout.max_model_len
        vllm_enable_sleep_mode=args.vllm_sleep,
        vllm_server_base_url=args.vllm_server_url if args.vllm == "server" else None,
        # token ids only, as opd asks of vLLM (ids past the small tokenizer's vocabulary are
        # never turned into text)
        generation_kwargs={"detokenize": False} if use_vllm else None,
    )
    trainer = DistillationTrainer(
        model=os.path.join(root, "student"),
        teacher_model=os.path.join(root, "teacher"),
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        callbacks=[callback(times)],
    )

    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        pushed = times.current("sync")
        completions = times.timed("generate", generate, *a, **k)
        times.discount("generate", times.current("sync") - pushed)  # vLLM's push, inside it
        times.count(sum(len(c) for c in completions))
        return completions

    trainer._generate_single_turn = timed_generate
    if use_vllm:
        push = trainer.vllm_generation.sync_weights
        trainer.vllm_generation.sync_weights = lambda: times.timed("sync", push)

    hidden = trainer._get_last_hidden_state

    def timed_hidden(*a, **k):
        if torch.is_grad_enabled():  # the student's forward (with grad): part of `learn`
            return hidden(*a, **k)
        return times.timed("teacher", hidden, *a, **k)

    trainer._get_last_hidden_state = timed_hidden
    return trainer


def render_ids(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):  # a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def run_gkd(args, root: str, cuda: bool, times: StepTimes):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    batch = args.prompts * args.samples_per_prompt
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "student"))
    questions = read_questions(os.path.join(root, "prompts.jsonl"), args.prompts * args.steps)
    prompt_ids = [render_ids(tok, q) for q in questions for _ in range(args.samples_per_prompt)]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(root, "student"), dtype=getattr(torch, args.student_dtype)
    )
    teacher = AutoModelForCausalLM.from_pretrained(
        os.path.join(root, "teacher"), dtype=torch.bfloat16 if cuda else torch.float32
    )
    pad = tok.pad_token_id

    def collate(rows):
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows])
        mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"])
                             for r in rows])  # fmt: skip
        # The Trainer counts the loss's tokens from these labels before the on-policy samples
        # replace them: as many as will be generated at most.
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.zeros(len(rows), args.new_tokens, dtype=torch.long),
            "prompts": ids,
            "prompt_attention_mask": mask,
        }

    fields = common_config(args, cuda, batch)
    cfg = GKDConfig(**fields, lmbda=1.0, max_new_tokens=args.new_tokens)
    trainer = GKDTrainer(
        model=model,
        teacher_model=teacher,
        args=cfg,
        train_dataset=Dataset.from_dict({"prompt_ids": prompt_ids}),
        data_collator=collate,
        processing_class=tok,
        callbacks=[callback(times)],
    )
    generate = trainer.generate_on_policy_outputs

    def timed_generate(*a, **k):
        out = times.timed("generate", generate, *a, **k)
        labels = out[2]
        times.count(int((labels != -100).sum()))
        return out

    trainer.generate_on_policy_outputs = timed_generate
    return trainer


def optimizer_precision(trainer) -> str:
    """What the optimizer updates, in which dtype (torch AdamW keeps its moments in the
    dtype of the weights it updates)."""
    opt = trainer.optimizer
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:  # accelerate's wrapper
        opt = opt.optimizer
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for g in opt.param_groups
                     for p in g["params"]})  # fmt: skip
    name = type(opt).__name__ + (" (fused)" if opt.defaults.get("fused") else "")
    if dtypes == ["bfloat16"]:
        return f"{name} on bf16 weights, bf16 moments, no fp32 master copy"
    where = f"{name} on {'/'.join(dtypes)} weights, moments alike"
    return where + (" (bf16 autocast forward and backward)" if trainer.args.bf16 else "")


def system_name(args) -> str:
    if args.mode == "gkd":
        return "trl-gkd-hf-generate"
    return {"colocate": "trl-distill-vllm-colocate", "server": "trl-distill-vllm-server",
            "none": "trl-distill-hf-generate"}[args.vllm]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="student-0.6b")
    ap.add_argument("--teacher", choices=sorted(SHAPES), default="teacher-1.8b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--mode", choices=("distill", "gkd"), default="distill")
    ap.add_argument("--vllm", choices=("colocate", "server", "none"), default="colocate")
    ap.add_argument("--vllm-gpu-util", type=float, default=0.3)
    ap.add_argument("--vllm-sleep", action="store_true", help="TRL's vllm_enable_sleep_mode")
    ap.add_argument("--vllm-server-url", default="http://127.0.0.1:8000")
    ap.add_argument("--micro", type=int, default=None,
                    help="per_device_train_batch_size (default: min(16, sequences per step)); "
                    "gradient accumulation covers the rest of the step")  # fmt: skip
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (TRL's "
                    "default is on; off here, as opd's learner)")  # fmt: skip
    ap.add_argument("--student-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--root", help="folder with student/, teacher/, prompts.jsonl (built if "
                    "missing; default: a new temporary folder)")  # fmt: skip
    ap.add_argument("--out", help="also append the JSON line to this file")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if args.mode == "gkd" and args.vllm != "none":
        raise SystemExit("--mode gkd samples with HF generate: pass --vllm none")
    if args.vllm != "none" and not cuda:
        raise SystemExit("vLLM needs a GPU here: pass --vllm none on CPU")
    if not cuda:
        args.student_dtype = "float32"  # no bf16 autocast on the CPU smoke
    batch = args.prompts * args.samples_per_prompt
    args.micro = args.micro or min(16, batch)
    root = args.root or tempfile.mkdtemp(prefix="trl-distill-root-")
    os.makedirs(root, exist_ok=True)
    n_student, n_teacher = prepare_root(args, root, cuda)

    times = StepTimes()
    t_start = time.perf_counter()
    trainer = (run_gkd if args.mode == "gkd" else run_distill)(args, root, cuda, times)
    startup = time.perf_counter() - t_start
    trainer.train()
    wall = time.perf_counter() - t_start
    import trl  # noqa: F401  (imported by now; its version goes into the report)

    logs = trainer.state.log_history
    step_s = median_after_first(times.step)
    tokens = median_after_first(times.tokens)
    # what was timed: GKD's teacher forward runs inside its loss, untimed; no push without vLLM
    measured = {"generate"} | ({"teacher"} if args.mode == "distill" else set())
    measured |= {"sync"} if args.mode == "distill" and args.vllm != "none" else set()
    phases = {k: median_after_first(v) if k in measured else None for k, v in times.phases.items()}
    learn = [s - sum(v[i] for v in times.phases.values()) for i, s in enumerate(times.step)]
    with open(os.path.join(root, "prompts.jsonl")) as f:
        words = [len(json.loads(line)["question"].split()) for line in f if line.strip()]
    vllm = args.mode == "distill" and args.vllm != "none"
    trl_class = (
        "trl.experimental.gkd.GKDTrainer" if args.mode == "gkd" else "trl.DistillationTrainer"
    )
    vllm_settings = None
    if vllm and args.vllm == "colocate":
        vllm_settings = (
            f"gpu_memory_utilization {args.vllm_gpu_util}, sleep {args.vllm_sleep}, TRL's "
            "max_num_batched_tokens 4096, vLLM's default compilation"
        )
    raw = {k: [round(t, 4) for t in v] if k in measured else None for k, v in times.phases.items()}
    result = {
        "benchmark": "trl_distill",
        "system": system_name(args),
        "trl_class": trl_class,
        "student": args.size,
        "student_params": n_student,
        "teacher": args.teacher,
        "teacher_params": n_teacher,
        "prompts_per_step": args.prompts,
        "samples_per_prompt": args.samples_per_prompt,
        "sequences_per_step": batch,
        "micro_batch": args.micro,
        "grad_accum": batch // args.micro,
        "new_tokens": args.new_tokens,
        "prompt_words": round(statistics.mean(words), 1),
        "loss": "reverse KL, full vocabulary (beta 1, temperature 1)",
        "loss_normalization": "sum over completion tokens / the step's completion tokens",
        "lr": args.lr,
        "lr_schedule": "constant",
        "optimizer": optimizer_precision(trainer),
        "gradient_checkpointing": args.grad_ckpt,
        "sampler": f"vLLM ({args.vllm})" if vllm else "HF generate",
        "vllm_settings": vllm_settings,
        "steps": args.steps,
        "steps_timed": max(0, len(times.step) - 1),
        "step_s": step_s,
        "generate_s": phases["generate"],
        "sync_s": phases["sync"],
        "teacher_s": phases["teacher"],
        "learn_s": median_after_first(learn),
        "learn_includes_teacher": args.mode == "gkd",
        "interval_s": round(statistics.median(times.interval), 4) if times.interval else None,
        "completion_tokens_per_step": tokens,
        "completion_tokens": "counted (lengths of the sampler's completions, EOS included)",
        "completion_tokens_per_s": round(tokens / step_s, 1) if tokens and step_s else None,
        "startup_s": round(startup, 1),
        "wall_s": round(wall, 1),
        "step_times": [round(t, 4) for t in times.step],
        "interval_times": [round(t, 4) for t in times.interval],
        **{f"{k}_times": v for k, v in raw.items()},
        "step_tokens": times.tokens,
        "losses": [round(r["loss"], 5) for r in logs if "loss" in r],
        # TRL's own per-step timer (DistillationTrainer: its training_step calls, without
        # the optimizer step), for comparison with step_times
        "trl_step_time": [round(r["step_time"], 4) for r in logs if "step_time" in r],
    }
    report(result)
    if args.out:
        from common import environment

        with open(args.out, "a") as f:
            f.write(json.dumps({**environment(), **result}) + "\n")


if __name__ == "__main__":
    main()
