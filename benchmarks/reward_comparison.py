"""GRPO vs TRRD vs reward-mixed OPD vs plain OPD on real SmolLM2-135M weights (issue #18).

    python benchmarks/reward_comparison.py --seeds 0 1 --work runs/reward_comparison

Every arm is `opd train` on its recipe (recipes/{grpo,trrd,reverse_kl}/smollm2-135m-arith*.yaml):
the same student (SmolLM2-135M-Instruct), prompts, sampling budget, learning rate, steps and
seeds; only the objective differs. The teacher is SmolLM2-135M-Instruct fine-tuned by
recipes/sft/smollm2-135m-arith.yaml (trained here first unless --teacher names one). Each run
logs the training reward per step and held-out pass@1 (arith-heldout, never a training
question) at its first and last step; this script gathers them into a JSON summary, a
markdown table, a plot, and a copy of every run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "grpo": "recipes/grpo/smollm2-135m-arith.yaml",
    "trrd": "recipes/trrd/smollm2-135m-arith.yaml",
    "opd+reward": "recipes/reverse_kl/smollm2-135m-arith-reward.yaml",
    "opd": "recipes/reverse_kl/smollm2-135m-arith.yaml",
}
TEACHER_RECIPE = "recipes/sft/smollm2-135m-arith.yaml"
PASS = "eval/arith-heldout/pass@1"


def opd_train(recipe: str, out: Path, overrides: list[str]) -> float:
    """Run `opd train` (resuming if `out` holds a run); its output goes to `<out>.log`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "opd.cli", "train", recipe, f"run.output_dir={out}", *overrides]
    t0 = time.time()
    with open(f"{out}.log", "ab") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}; see {out}.log")
    return time.time() - t0


def run_summary(run: Path) -> dict:
    from opd.metrics import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    evals = [(r["step"], r[PASS]) for r in rows if r.get(PASS) is not None]
    rewards = {r["step"]: r["reward/mean"] for r in rows if r.get("reward/mean") is not None}
    return {
        "pass1_by_step": dict(evals),
        "pass1_end": evals[-1][1],
        "reward_by_step": [rewards[s] for s in sorted(rewards)],
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict) -> str:
    base, teacher = results["base_pass1"], results["teacher"]["pass1_end"]
    lines = [
        f"Held-out pass@1 of the untrained student {base:.3f}, of the teacher {teacher:.3f}.",
        "",
        "| objective | held-out pass@1 after training | change | per seed "
        "| train reward, first 5 steps | last 5 steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, runs in results["arms"].items():
        ends = [r["pass1_end"] for r in runs.values()]
        end = mean_sd(ends)
        first = mean_sd([statistics.fmean(r["reward_by_step"][:5]) for r in runs.values()])
        last = mean_sd([statistics.fmean(r["reward_by_step"][-5:]) for r in runs.values()])
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (end, first, last)]
        seeds = ", ".join(f"{e:.3f}" for e in ends)
        change = f"{end[0] - base:+.3f}"
        lines.append(f"| {arm} | {cells[0]} | {change} | {seeds} | {cells[1]} | {cells[2]} |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, runs in results["arms"].items():
        curves = [r["reward_by_step"] for r in runs.values()]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        window = 4  # trailing moving average: 16 samples a step make a noisy curve
        smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(n)]
        left.plot(range(1, n + 1), smooth, label=arm)
    left.set_xlabel("step")
    left.set_ylabel(f"training reward (mean over seeds, {window}-step average)")
    left.set_title("math_correct on the student's own samples")
    left.legend()
    arms = list(results["arms"])
    for i, arm in enumerate(arms):
        ends = [r["pass1_end"] for r in results["arms"][arm].values()]
        right.bar(i, statistics.fmean(ends), color="tab:blue", alpha=0.6)
        right.scatter([i] * len(ends), ends, color="black", zorder=3, s=12)
    right.axhline(results["base_pass1"], color="gray", linestyle="--", label="untrained student")
    teacher = results["teacher"]["pass1_end"]
    right.axhline(teacher, color="tab:green", linestyle=":", label="teacher")
    right.set_xticks(range(len(arms)), arms)
    right.set_ylabel("held-out pass@1 after training (dots: seeds)")
    right.set_title("arith-heldout, 64 problems x 4 samples, T = 1")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--teacher", type=Path, help="the teacher's HF folder (default: train it)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/reward_comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/reward_comparison.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/reward_comparison.png")
    ap.add_argument("--raw", type=Path, default=ROOT / "benchmarks/results/reward_comparison")
    args = ap.parse_args()

    work = args.work.resolve()
    seconds: dict[str, float] = {}
    teacher_run = work / "teacher"
    if args.teacher is None:
        seconds["teacher"] = opd_train(TEACHER_RECIPE, teacher_run, [])
        args.teacher = teacher_run / "student"
    results: dict = {"teacher": run_summary(teacher_run), "arms": {}}
    results["base_pass1"] = results["teacher"]["pass1_by_step"][0]
    for arm in args.arms:
        results["arms"][arm] = {}
        for seed in args.seeds:
            run = work / f"{arm.replace('+', '-')}-s{seed}"
            # no checkpoints or export: only the metrics are kept (the runs take CPU time enough)
            overrides = [
                f"run.seed={seed}",
                f"teacher.path={args.teacher.resolve()}",
                "checkpoint.every=0",
                "checkpoint.export_student=false",
                # the untrained student's score is the teacher run's step 0 (same model, same
                # held-out problems and samples): not measured again in every arm
                "eval.at_start=false",
            ]
            seconds[run.name] = opd_train(ARMS[arm], run, overrides)
            results["arms"][arm][f"seed{seed}"] = run_summary(run)
            args.raw.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / "metrics.jsonl", args.raw / f"{run.name}.metrics.jsonl")
            print(f"{run.name}: {results['arms'][arm][f'seed{seed}']}", flush=True)
    shutil.copy(teacher_run / "metrics.jsonl", args.raw / "teacher.metrics.jsonl")
    results["settings"] = {"seeds": args.seeds, "recipes": ARMS, "teacher": TEACHER_RECIPE}
    results["wall_seconds"] = seconds
    results["table"] = table(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    print(results["table"])


if __name__ == "__main__":
    main()
