"""DeepSpeed learner ranks as Ray actors, started the way `opd train` starts them
(`opd.cluster.placement.spawn`, one bundle per rank), on synthetic batches: does the process
group form, and how long is a step on 1 and on N ranks (weak scaling, same batch per rank)?

    python benchmarks/ray_learners.py --world 2               # GPU: one GPU per rank
    python benchmarks/ray_learners.py --size tiny --world 2 --batch 4 --micro 2 --steps 2  # CPU

Steps are timed from the driver (submit to gather); the first is warm-up, reported as
`warmup_step_s` and not counted. The other fields are `learner_step.py`'s (`step_rates`):
each timed step's tokens (`step_tokens`, all ranks) beside its seconds (`step_times`),
`tokens_per_s` = sum(step_tokens) / sum(step_times), `flops_per_token` = 6 N, `peak_flops`,
and MFU per GPU where the peak is known. `scaling_efficiency` = tokens_per_s on N ranks over
N x tokens_per_s on one. `--replay LOG` recomputes rows logged before 2026-11-30, which divided
the last step's tokens by the median time of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_folder, peak_flops, report  # noqa: E402
from learner_step import batch, logged_rows, step_batches, step_rates  # noqa: E402

PROMPT, COMPLETION = (64, 256), (128, 1024)  # sampled lengths, tokens


def run(args, folder: str, world: int, cuda: bool, n_params: int, peak: float | None) -> dict:
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
    shape = SHAPES[args.size]
    times, step_seqs, losses = [], [], []
    for step in range(1, args.steps + 1):
        full = batch(args.batch * world, PROMPT, COMPLETION, shape["vocab_size"], step)
        normalizer = sum(s.n_tokens for s in full)
        t = time.perf_counter()
        refs = [
            h.train_step.remote(normalizer, full[r::world]) for r, h in enumerate(group.handles)
        ]
        out = group.gather(refs, "train_step")
        times.append(time.perf_counter() - t)
        step_seqs.append([(len(s.prompt_ids), s.n_tokens) for s in full])
        losses.append(out[0]["train/loss"])
        # every rank reports the same all-reduced loss
        assert all(abs(o["train/loss"] - out[0]["train/loss"]) < 1e-6 for o in out), out
    group.kill()
    warm = 1 if args.steps > 1 else 0  # the first step includes warm-up
    return {
        "world": world,
        "startup_s": round(startup, 1),
        "warmup_step_s": round(times[0], 4) if warm else None,
        **step_rates(step_seqs[warm:], times[warm:], world, shape, n_params, peak),
        "losses": [round(x, 5) for x in losses],
    }


def efficiency(one: dict, many: dict) -> float:
    return round(many["tokens_per_s"] / (many["world"] * one["tokens_per_s"]), 3)


def replay(paths: list[str]) -> None:
    """Recompute logged rows (their `step_times` include the warm-up step; the old code paired
    the last step's tokens with the median of the others' times): redraw every step's batch."""
    for path in paths:
        one = None
        for row in logged_rows(path, "ray_learners"):
            times, world, shape = row["step_times"], row["world"], SHAPES[row["size"]]
            steps = range(1, len(times) + 1)
            seqs = step_batches(
                row["batch_per_rank"] * world, PROMPT, COMPLETION, shape["vocab_size"], steps
            )
            if sum(p + c for p, c in seqs[-1]) != row["tokens_per_step"]:
                raise SystemExit(f"{path}: world {world}: the redrawn batches do not match")
            peak = peak_flops(row["device"])
            new = step_rates(seqs[1:], times[1:], world, shape, row["params"], peak)
            new["warmup_step_s"] = times[0]
            old = ("tokens_per_step", "seconds_per_step", "tokens_per_s", "scaling_efficiency")
            logged = {k: row.pop(k) for k in old if k in row}
            row.update(new)
            if world == 1:
                one = row
            elif one is not None:
                row["scaling_efficiency"] = efficiency(one, row)
            print(json.dumps({**row, "replayed_from": path, "logged": logged}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="student-0.6b")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--peak-flops", type=float, help="FLOP/s per device, instead of the table")
    ap.add_argument("--replay", nargs="+", metavar="LOG", help="recompute logged rows, no run")
    args = ap.parse_args()
    if args.replay:
        return replay(args.replay)

    import ray

    cuda = torch.cuda.is_available()
    folder = os.path.join(tempfile.mkdtemp(), "student")
    n_params = build_folder(args.size, folder, "bfloat16" if cuda else "float32")
    peak = args.peak_flops or (peak_flops(torch.cuda.get_device_name(0)) if cuda else None)
    ray.init(include_dashboard=False, log_to_driver=True)
    sizes = {
        "benchmark": "ray_learners",
        "size": args.size,
        "params": n_params,
        "zero": args.zero,
        "batch_per_rank": args.batch,
        "micro_batch": args.micro,
    }
    one = run(args, folder, 1, cuda, n_params, peak)
    report({**sizes, **one})
    if args.world > 1:
        many = run(args, folder, args.world, cuda, n_params, peak)
        report({**sizes, **many, "scaling_efficiency": efficiency(one, many)})


if __name__ == "__main__":
    main()
