"""A full on-policy step per phase, learner and rollout/teacher on separate GPUs or shared.

    python benchmarks/split_step.py --layout colocated --student tiny --teacher tiny-teacher \
        --new-tokens 16                                                 # CPU smoke
    python benchmarks/split_step.py --layout split       # GPU 0: learner; GPU 1: vLLM + teacher
    python benchmarks/split_step.py --layout colocated   # everything on GPU 0

opd's roles without Ray, one process per GPU: `Learner` (DeepSpeed, world size 1),
`RolloutWorker` (vLLM, engine in its process) and `TeacherScorer`, with the sampled
reverse-KL objective. `split`: the samples go from the rollout process to the learner's
through a queue, and the new weights come back over NCCL (`Learner.init_weight_group` /
`broadcast_weights` on one side, `RolloutWorker.init_weight_group` / `receive_weights` on
the other: the `NcclWeightSync` transport, vLLM's PyNccl). `colocated`: one process, the
weights handed to vLLM as tensors on the same device. Per phase: median of steps 2..N.
The weight-sync floor is 2 N bytes over the link (NVLink 4, 450 GB/s one way, datasheet),
and `link_bytes_per_s` is a plain NCCL broadcast of 1 GiB measured on the same pair.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_folder, random_prompts, report, visible_devices  # noqa: E402,I001


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median(xs):
    return round(statistics.median(xs[1:] if len(xs) > 1 else xs), 4)


def make_learner(args, student: str, port: int):
    from opd.config.schema import LearnerConfig, ObjectiveConfig
    from opd.learner.worker import Learner

    cuda = torch.cuda.is_available()
    cfg = LearnerConfig(
        dtype="bfloat16" if cuda else "float32",
        micro_batch_size=args.micro,
        zero_stage=args.zero if cuda else 0,
        lr=1e-6,
    )
    return Learner(
        0,
        1,
        "127.0.0.1",
        port,
        student,
        cfg,
        ObjectiveConfig(),
        total_steps=args.steps + 1,
        grad_accum_steps=args.prompts // args.micro,
        seed=0,
        device="cuda" if cuda else "cpu",
    )


def make_rollout_and_teacher(args, student: str, teacher: str):
    from opd.config.schema import RolloutConfig, TeacherConfig
    from opd.rollout.worker import RolloutWorker
    from opd.teacher.scorer import TeacherScorer

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    device = "cuda" if cuda else "cpu"
    scorer = TeacherScorer(
        TeacherConfig(path=teacher, dtype=dtype, token_budget=65536, logprob_chunk_tokens=2048),
        teacher,
        device=device,
    )
    scorer.prompt_ids = lambda sample: sample.prompt_ids  # ids already
    compilation = {"mode": 0, "cudagraph_mode": args.cudagraph_mode} if cuda else None
    rollout = RolloutWorker(
        student,
        RolloutConfig(
            dtype=dtype,
            max_model_len=args.prompt_len + args.new_tokens + 8,
            enforce_eager=not cuda,
            gpu_memory_utilization=args.vllm_memory if cuda else None,
            kv_cache_memory_bytes=4 * 2**30 if cuda else None,  # no profiling next to others
        ),
        seed=0,
        device=device,
        compilation_config=compilation,
    )
    return rollout, scorer


def sample_step(rollout, scorer, prompts, args, step: int):
    from opd.objectives import TeacherRequest
    from opd.samples import GenerationRequest, Sample, sample_seed

    t0 = time.perf_counter()
    reqs = [
        GenerationRequest(Sample(i, 0, str(i), [], p), sample_seed(0, step, i, 0))
        for i, p in enumerate(prompts)
    ]
    _, samples = rollout.generate(reqs, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0)
    t1 = time.perf_counter()
    scorer.score(samples, TeacherRequest("sampled"))
    t2 = time.perf_counter()
    return samples, t1 - t0, t2 - t1


def learner_process(args, student, port, sync_port, to_learner, from_learner):
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(0, 2)
    learner = make_learner(args, student, port)
    from_learner.put(learner.weight_specs("bfloat16"))
    learner.init_weight_group("127.0.0.1", sync_port, 2)
    while (item := to_learner.get()) is not None:
        samples, normalizer = item
        t0 = time.perf_counter()
        loss = learner.train_step(normalizer, samples)["train/loss"]
        _sync()
        from_learner.put((time.perf_counter() - t0, loss))
        learner.broadcast_weights("bfloat16")
        _sync()


def link_bandwidth(rank: int, port: int) -> float:
    """NCCL broadcast of 1 GiB between cuda:0 of two processes (both GPUs visible)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buf = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        dist.broadcast(buf, 0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dist.broadcast(buf, 0)
    torch.cuda.synchronize()
    rate = 10 * buf.numel() * 2 / (time.perf_counter() - t0)
    dist.destroy_process_group()
    return rate


def _link_proc(rank, port, out):
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(rank, 2)
    rate = link_bandwidth(rank, port)
    if rank == 1:
        out.put(rate)


def run_split(args, student, teacher, prompts) -> dict:
    from opd.cluster.placement import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_link_proc, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    link = out.get()
    for p in procs:
        p.join()

    to_learner, from_learner = ctx.Queue(), ctx.Queue()
    sync_port = free_port()
    lp = ctx.Process(
        target=learner_process,
        args=(args, student, free_port(), sync_port, to_learner, from_learner),
    )
    lp.start()
    rollout, scorer = make_rollout_and_teacher(args, student, teacher)
    specs = from_learner.get()
    rollout.init_weight_group("127.0.0.1", sync_port, 1, 2)
    phases = {k: [] for k in ("rollout", "teacher", "handoff", "learn", "sync", "step")}
    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        samples, t_roll, t_teach = sample_step(rollout, scorer, prompts, args, step)
        t1 = time.perf_counter()
        to_learner.put((samples, sum(s.n_tokens for s in samples)))
        learn_s, loss = from_learner.get()
        t2 = time.perf_counter()
        rollout.receive_weights(specs, step)
        _sync()
        t3 = time.perf_counter()
        for k, v in zip(phases, (t_roll, t_teach, t2 - t1 - learn_s, learn_s, t3 - t2, t3 - t0)):
            phases[k].append(v)
        losses.append(loss)
    to_learner.put(None)
    lp.join()
    nbytes = sum(torch.Size(s).numel() * 2 for _, _, s in specs)
    return _summary(phases, losses, nbytes, link)


def run_colocated(args, student, teacher, prompts) -> dict:
    from opd.cluster.placement import free_port

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    learner = make_learner(args, student, free_port())
    rollout, scorer = make_rollout_and_teacher(args, student, teacher)
    phases = {k: [] for k in ("rollout", "teacher", "learn", "sync", "step")}
    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        samples, t_roll, t_teach = sample_step(rollout, scorer, prompts, args, step)
        t1 = time.perf_counter()
        losses.append(learner.train_step(sum(s.n_tokens for s in samples), samples)["train/loss"])
        _sync()
        t2 = time.perf_counter()
        named = [(n, p.detach()) for n, p in learner.model.named_parameters()]
        rollout.load_weights_from_tensors(named, step)
        _sync()
        t3 = time.perf_counter()
        for k, v in zip(phases, (t_roll, t_teach, t2 - t1, t3 - t2, t3 - t0)):
            phases[k].append(v)
    nbytes = sum(p.numel() * 2 for _, p in named)
    return _summary(phases, losses, nbytes, None)


def _summary(phases, losses, nbytes, link) -> dict:
    out = {f"{k}_s": _median(v) for k, v in phases.items()}
    out["step_times"] = [round(t, 4) for t in phases["step"]]
    out["losses"] = [round(x, 4) for x in losses]
    out["sync_bytes"] = nbytes
    if link:
        out["link_bytes_per_s"] = round(link)
        out["sync_floor_s"] = round(nbytes / 450e9, 5)
        out["sync_fraction_of_nvlink"] = round(nbytes / 450e9 / out["sync_s"], 4)
        out["sync_fraction_of_measured_link"] = round(nbytes / link / out["sync_s"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=("split", "colocated"), default="split")
    ap.add_argument("--student", choices=sorted(SHAPES), default="student-0.6b")
    ap.add_argument("--teacher", choices=sorted(SHAPES), default="teacher-1.8b")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cudagraph-mode", default="FULL_DECODE_ONLY")
    ap.add_argument("--vllm-memory", type=float, default=0.3)
    args = ap.parse_args()
    if args.layout == "split":  # this process: rollout + teacher on GPU 1 (set before CUDA starts)
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(1, 2)

    root = tempfile.mkdtemp()
    student, teacher = os.path.join(root, "student"), os.path.join(root, "teacher")
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    n_student = build_folder(args.student, student, dtype, seed=0)
    n_teacher = build_folder(args.teacher, teacher, dtype, seed=1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    prompts = random_prompts(args.prompts, args.prompt_len, SHAPES[args.student]["vocab_size"])
    run = run_split if args.layout == "split" else run_colocated
    result = run(args, student, teacher, prompts)
    report(
        {
            "benchmark": "split_step",
            "layout": args.layout,
            "student": args.student,
            "student_params": n_student,
            "teacher": args.teacher,
            "teacher_params": n_teacher,
            "objective": "reverse_kl (sampled)",
            "prompts": args.prompts,
            "micro_batch": args.micro,
            "zero": args.zero,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            **result,
        }
    )


if __name__ == "__main__":
    main()
