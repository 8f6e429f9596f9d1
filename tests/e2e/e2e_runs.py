"""What the e2e runs share: the overrides that make a run tiny, and metrics compared across runs."""

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
