"""What the e2e runs share: the overrides that make a run tiny, running a recipe, metrics
compared across runs, and acting on a run (killing an actor) once it has logged a step."""

import time
from pathlib import Path

# four prompts of 16 new tokens a step, two per micro-batch, no export, no progress bar
SHORT = [
    "checkpoint.export_student=false",
    "rollout.prompts_per_step=4",
    "rollout.max_new_tokens=16",
    "learner.micro_batch_size=2",
    "run.progress=false",
    "cluster.timeout_s=600",
]

# timings, and counters that differ between a run and its control by design
VOLATILE = ("time/", "perf/", "sync/export_s", "sync/load_s")


def stable(rows, also=()):
    """`rows` without the volatile metrics (and those starting with any prefix in `also`)."""
    drop = VOLATILE + tuple(also)
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def train_rows(recipe, overrides: list[str]) -> list[dict]:
    """`opd train`'s library call on `recipe` with `overrides`; the run's metrics rows."""
    from opd.config import load_config
    from opd.loop import train
    from opd.metrics import read_metrics

    cfg = load_config(recipe, overrides)
    train(cfg)
    return read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")


def short_run(recipe, out, steps: int, *extra: str) -> list[dict]:
    """`recipe` for `steps` tiny steps (SHORT) into `out`, checkpointing every 2, no eval."""
    overrides = [f"run.output_dir={out}", *SHORT, f"trainer.steps={steps}", "eval.every=0"]
    return train_rows(recipe, [*overrides, "checkpoint.every=2", *extra])


def when_logged(metrics: Path, step: int, act, done: list) -> None:
    """`done.append(act())` once the run writing `metrics` has logged `step` (a thread's job)."""
    from opd.metrics import read_metrics

    while not done:
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)):
            done.append(act())
            return
        time.sleep(0.05)


def alive_pids(actor_class: str) -> list[int]:
    """Pids of the live actors of `actor_class`, from the GCS actor table (the state API needs
    the dashboard, which the test session omits)."""
    from ray._private.state import actors

    return sorted(
        a["Pid"]
        for a in actors().values()
        if a["ActorClassName"] == actor_class and a["State"] == "ALIVE" and a["Pid"]
    )
