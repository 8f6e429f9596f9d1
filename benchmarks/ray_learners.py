"""DeepSpeed learner ranks as Ray actors, started the way `opd train` starts them
(`opd.cluster.placement.spawn`, one bundle per rank), on synthetic batches: does the process
group form, and how long is a step on 1 and on N ranks (weak scaling, same batch per rank)?

    python benchmarks/ray_learners.py --world 2               # GPU: one GPU per rank
    python benchmarks/ray_learners.py --size tiny --world 2 --batch 4 --micro 2 --steps 2  # CPU
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
from common import SHAPES, build_folder, report  # noqa: E402
from learner_step import batch  # noqa: E402


def run(args, folder: str, world: int, cuda: bool) -> dict:
    from opd.cluster.placement import spawn
    from opd.config.schema import LearnerConfig, ObjectiveConfig
    from opd.learner.worker import Learner

    cfg = LearnerConfig(
        dtype="bfloat16" if cuda else "float32",
        micro_batch_size=args.micro,
        zero_stage=args.zero,
    )
    objective = ObjectiveConfig(name="reverse_kl", params={"estimator": "sampled"})
    bundle = {"CPU": 1, **({"GPU": 1} if cuda else {})}
    t0 = time.perf_counter()
    group = spawn(
        f"learner x{world}",
        Learner,
        [dict(bundle) for _ in range(world)],
        lambda i, master: (
            (
                i,
                world,
                master[0],
                master[1],
                folder,
                cfg,
                objective,
                args.steps + 1,
                1,
                0,
                "cuda" if cuda else "cpu",
            ),
            {},
        ),  # fmt: skip
        timeout_s=args.timeout,
    )
    startup = time.perf_counter() - t0
    vocab = SHAPES[args.size]["vocab_size"]
    times, losses = [], []
    for step in range(1, args.steps + 1):
        full = batch(args.batch * world, (64, 256), (128, 1024), vocab, step)
        normalizer = sum(s.n_tokens for s in full)
        t = time.perf_counter()
        refs = [
            h.train_step.remote(full[r::world], normalizer) for r, h in enumerate(group.handles)
        ]
        out = group.gather(refs, "train_step")
        times.append(time.perf_counter() - t)
        losses.append(out[0]["train/loss"])
        # every rank reports the same all-reduced loss
        assert all(abs(o["train/loss"] - out[0]["train/loss"]) < 1e-6 for o in out), out
    tokens = sum(len(s.prompt_ids) + s.n_tokens for s in full)
    group.kill()
    sec = statistics.median(times[1:] or times)
    return {
        "world": world,
        "startup_s": round(startup, 1),
        "seconds_per_step": round(sec, 4),
        "step_times": [round(x, 4) for x in times],
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / sec, 1),
        "losses": [round(x, 5) for x in losses],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="student-0.6b")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()

    import ray

    cuda = torch.cuda.is_available()
    folder = os.path.join(tempfile.mkdtemp(), "student")
    n_params = build_folder(args.size, folder, "bfloat16" if cuda else "float32")
    ray.init(include_dashboard=False, log_to_driver=True)
    sizes = {
        "benchmark": "ray_learners",
        "size": args.size,
        "params": n_params,
        "zero": args.zero,
        "batch_per_rank": args.batch,
        "micro_batch": args.micro,
    }
    one = run(args, folder, 1, cuda)
    report({**sizes, **one})
    if args.world > 1:
        many = run(args, folder, args.world, cuda)
        eff = many["tokens_per_s"] / (args.world * one["tokens_per_s"])
        report({**sizes, **many, "scaling_efficiency": round(eff, 3)})


if __name__ == "__main__":
    main()
