"""Bytes through the driver per step of `opd train`: what the driver's Python receives from
actors (every `ray.get` of the actor groups) and what it serializes into actor calls (their
arguments; an object reference passed on counts as the few bytes of the reference).

    python benchmarks/driver_bytes.py --recipe recipes/reverse_kl/tiny.yaml \
        --out benchmarks/results/<date>-cpu-driver-bytes.json objective.params.estimator=full

Sizes are those of `ray.cloudpickle.dumps` (a tensor counts its data). Ray passes a return
value under 100 KiB inline through the owner's process without this Python seeing it; such
values are not counted here once the driver no longer `ray.get`s them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _size(x) -> int:
    import ray

    return len(ray.cloudpickle.dumps(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/reverse_kl/tiny.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import ray
    import ray.actor

    from opd.cluster import group as group_mod
    from opd.config import load_config
    from opd.loop import train

    counts = {"get": 0, "args": 0, "phase": "start-up"}
    per_phase: dict[str, dict[str, int]] = {}

    def add(kind: str, n: int) -> None:
        counts[kind] += n
        row = per_phase.setdefault(counts["phase"], {"get": 0, "args": 0})
        row[kind] += n

    real_get = ray.get

    def counting_get(refs, *a, **k):
        out = real_get(refs, *a, **k)
        add("get", _size(out))
        return out

    group_mod.ray.get = counting_get  # the actor groups' waits: every result the driver reads
    real_remote = ray.actor.ActorMethod._remote

    def counting_remote(self, args=None, kwargs=None, **options):
        add("args", _size((args or (), kwargs or {})))
        return real_remote(self, args=args, kwargs=kwargs, **options)

    ray.actor.ActorMethod._remote = counting_remote

    import opd.loop as loop

    def phase(name: str, fn):
        def wrapped(*a, **k):
            counts["phase"] = name
            return fn(*a, **k)

        return wrapped

    # start-up until the first batch is submitted; the steps; the final checkpoint
    loop.Rollouts.start = phase("steps", loop.Rollouts.start)
    loop.save_checkpoint = phase("checkpoint", loop.save_checkpoint)
    out = Path(f"/tmp/opd-driver-bytes-{time.time_ns()}")
    cfg = load_config(
        args.recipe,
        [
            f"run.output_dir={out}",
            f"trainer.steps={args.steps}",
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.export_student=false",
            "run.progress=false",
            *args.overrides,
        ],
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    train(cfg)
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "steps": args.steps,
        "total_bytes_get": counts["get"],
        "total_bytes_args": counts["args"],
        "per_phase": per_phase,
        "per_step_bytes": sum(per_phase.get("steps", {}).values()) / args.steps,
        "wall_s": time.perf_counter() - t0,
        "opd": str(Path(loop.__file__).parent.parent),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
