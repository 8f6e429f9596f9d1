"""Objectives compared on real SmolLM2-135M weights, each arm through `opd train`.

    python benchmarks/reward_comparison.py --seeds 0 1                  # issue #18
    python benchmarks/reward_comparison.py --study tools --seeds 0 1    # issue #19

`--study rewards`: GRPO vs TRRD vs reward-mixed OPD vs plain OPD
(recipes/{grpo,trrd,reverse_kl}/smollm2-135m-arith*.yaml); the teacher is
recipes/sft/smollm2-135m-arith.yaml. `--study anchor`: GRPO with and without the AAPA
anchor (recipes/aapa/smollm2-135m-arith-grpo.yaml; its discriminator is made first by the
command in the recipe's header; `anchor.coef=0` logs D and trains as plain GRPO).
`--study tools`: SOD vs plain OPD on trajectories that
call the python tool (recipes/{sod,reverse_kl}/smollm2-135m-arith-tools.yaml); the teacher is
recipes/sft/smollm2-135m-arith-tools.yaml, fine-tuned on solutions that call the tool.

Within a study every arm has the same student (SmolLM2-135M-Instruct), prompts, sampling
budget, learning rate, steps and seeds; only the objective differs. The teacher is trained
here first unless --teacher names one. Each run logs the training reward per step and held-out
pass@1 (arith-heldout, never a training question) at its first and last step (with the tool
study, the tool-call rates and SOD's step weights too); this script gathers them into a JSON
summary, a markdown table, a plot, and a copy of every run's metrics.jsonl.
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
STUDIES = {
    "rewards": {
        "arms": {
            "grpo": "recipes/grpo/smollm2-135m-arith.yaml",
            "trrd": "recipes/trrd/smollm2-135m-arith.yaml",
            "opd+reward": "recipes/reverse_kl/smollm2-135m-arith-reward.yaml",
            "opd": "recipes/reverse_kl/smollm2-135m-arith.yaml",
        },
        "teacher": "recipes/sft/smollm2-135m-arith.yaml",
        "name": "reward_comparison",
    },
    "tools": {
        "arms": {
            "sod": "recipes/sod/smollm2-135m-arith-tools.yaml",
            "opd": "recipes/reverse_kl/smollm2-135m-arith-tools.yaml",
        },
        "teacher": "recipes/sft/smollm2-135m-arith-tools.yaml",
        "name": "tool_comparison",
    },
    "anchor": {  # an arm is a recipe, or (recipe, its overrides)
        "arms": {
            "grpo": ("recipes/aapa/smollm2-135m-arith-grpo.yaml", ["anchor.coef=0"]),
            "grpo+anchor": "recipes/aapa/smollm2-135m-arith-grpo.yaml",
        },
        "teacher": None,  # no teacher: each run measures the untrained student at step 0
        "discriminator": "recipes/aapa/smollm2-135m-arith-grpo.yaml",
        "name": "anchor_comparison",
    },
}
PASS = "eval/arith-heldout/pass@1"
TOOL_RATE = "eval/arith-heldout/tool_call_rate"
# per-step means logged by a run (those it logs): training tool use and SOD's step weights
STEP_KEYS = (
    "agent/tool_call_rate",
    "agent/tool_calls",
    "sod/later_step_tokens",
    "sod/step_weight",
    "sod/later_step_weight",
    "sod/step_divergence",
    "anchor/D",
    "anchor/advantage_share",
)


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
    out = {
        "pass1_by_step": dict(evals),
        "pass1_end": evals[-1][1],
        "reward_by_step": [rewards[s] for s in sorted(rewards)],
    }
    tool_rates = [(r["step"], r[TOOL_RATE]) for r in rows if r.get(TOOL_RATE) is not None]
    if tool_rates:
        out["tool_call_rate_by_step"] = dict(tool_rates)
    for key in STEP_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None and "eval" not in key]
        if values:
            out[key] = {"by_step": values, "mean": statistics.fmean(values)}
    return out


def make_discriminator(recipe: str, out: Path) -> float:
    """Run the `opd discriminator train` line of `recipe`'s header, writing to `out`."""
    from opd.anchor.discriminator import recipe_command

    cmd = recipe_command(ROOT / recipe)
    cmd[cmd.index("--out") + 1] = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(f"{out}.log", "ab") as log:
        argv = [sys.executable, "-m", "opd.cli", *cmd[1:]]
        rc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}; see {out}.log")
    return time.time() - t0


def later_weight(run: dict) -> float:
    """SOD's mean weight of a token in a step after the first, over the steps that had any:
    the logged token-mean of weight x later over the token share of later steps."""
    w, n = run["sod/later_step_weight"]["by_step"], run["sod/later_step_tokens"]["by_step"]
    return statistics.fmean([a / b for a, b in zip(w, n, strict=True) if b > 0])


def first_last(curves: list[list[float]], n: int = 5) -> tuple[str, str]:
    """ "mean ± sd" over runs of each curve's mean over its first and its last n steps."""
    cells = []
    for part in (slice(None, n), slice(-n, None)):
        m, sd = mean_sd([statistics.fmean(c[part]) for c in curves])
        cells.append(f"{m:.3f} ± {sd:.3f}")
    return cells[0], cells[1]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict) -> str:
    base = results["base_pass1"]
    head = f"Held-out pass@1 of the untrained student {base:.3f}"
    if "teacher" in results:
        head += f", of the teacher {results['teacher']['pass1_end']:.3f}"
    lines = [
        head + ".",
        "",
        "| objective | held-out pass@1 after training | change | per seed "
        "| train reward, first 5 steps | last 5 steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, runs in results["arms"].items():
        ends = [r["pass1_end"] for r in runs.values()]
        end = mean_sd(ends)
        first, last = first_last([r["reward_by_step"] for r in runs.values()])
        seeds = ", ".join(f"{e:.3f}" for e in ends)
        change = f"{end[0] - base:+.3f}"
        cells = [f"{end[0]:.3f} ± {end[1]:.3f}", change, seeds, first, last]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if "base_tool_call_rate" in results:
        lines += tool_table(results)
    if "discriminator" in results:
        lines += anchor_table(results)
    return "\n".join(lines)


def anchor_table(results: dict) -> list[str]:
    """The discriminator's held-out scores, and D on the rollouts over the first and last 5
    steps of each arm (means over seeds)."""
    held = results["discriminator"]["metrics"]["heldout"]
    lines = [
        "",
        f"Discriminator (held-out prompts): accuracy {held['accuracy']:.3f}, AUC "
        f"{held['auc']:.3f}, mean D {held['mean_D_expert']:.3f} on expert and "
        f"{held['mean_D_policy']:.3f} on policy responses ({held['n']} responses).",
        "",
        "| objective | D on rollouts, first 5 steps | last 5 steps | anchor's share of the "
        "advantage |",
        "| --- | --- | --- | --- |",
    ]
    for arm, runs in results["arms"].items():
        runs = list(runs.values())
        cells = list(first_last([r["anchor/D"]["by_step"] for r in runs]))
        share = [r["anchor/advantage_share"]["mean"] for r in runs if "anchor/advantage_share" in r]
        cells.append(f"{statistics.fmean(share):.3f}" if share else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def tool_table(results: dict) -> list[str]:
    """Tool use: held-out tool-call rate at the end, the training rate over the first and
    last 5 steps, and SOD's step weights (means over steps, then over seeds)."""
    teacher = results["teacher"]["tool_call_rate_by_step"]
    lines = [
        "",
        f"Held-out tool-call rate of the untrained student {results['base_tool_call_rate']:.3f}, "
        f"of the teacher {list(teacher.values())[-1]:.3f}.",
        "",
        "| objective | held-out tool-call rate after training | training tool-call rate, "
        "first 5 steps | last 5 steps | tool calls per sample | step weight (token mean) | "
        "weight of a later step's token | step divergence d_k |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, runs in results["arms"].items():
        runs = list(runs.values())
        end = mean_sd([list(r["tool_call_rate_by_step"].values())[-1] for r in runs])
        cells = [f"{end[0]:.3f} ± {end[1]:.3f}"]
        cells += first_last([r["agent/tool_call_rate"]["by_step"] for r in runs])
        calls = mean_sd([r["agent/tool_calls"]["mean"] for r in runs])
        cells.append(f"{calls[0]:.2f} ± {calls[1]:.2f}")
        if all("sod/step_weight" in r for r in runs):
            w = mean_sd([r["sod/step_weight"]["mean"] for r in runs])
            later = mean_sd([later_weight(r) for r in runs])
            d = mean_sd([r["sod/step_divergence"]["mean"] for r in runs])
            cells += [f"{m:.3f} ± {sd:.3f}" for m, sd in (w, later, d)]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


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
    if "teacher" in results:
        teacher = results["teacher"]["pass1_end"]
        right.axhline(teacher, color="tab:green", linestyle=":", label="teacher")
    right.set_xticks(range(len(arms)), arms)
    right.set_ylabel("held-out pass@1 after training (dots: seeds)")
    tools = " (with the python tool)" if "base_tool_call_rate" in results else ""
    right.set_title(f"arith-heldout{tools}, 64 problems x 4 samples, T = 1")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", choices=list(STUDIES), default="rewards")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", help="a subset of the study's arms (default: all)")
    ap.add_argument("--teacher", type=Path, help="the teacher's HF folder (default: train it)")
    ap.add_argument("--work", type=Path, help="runs go here (default: runs/<study's name>)")
    ap.add_argument(
        "--summarize", action="store_true", help="train nothing: gather the runs in --work"
    )
    args = ap.parse_args()
    study = STUDIES[args.study]
    arms, name = study["arms"], study["name"]
    for arm in args.arms or []:
        if arm not in arms:
            raise SystemExit(f"--arms: {arm!r} is not an arm of {args.study}: {', '.join(arms)}")
    raw = ROOT / "benchmarks/results" / name

    work = (args.work or ROOT / "runs" / name).resolve()
    seconds: dict[str, float] = {}
    results: dict = {"arms": {}}
    teacher_run = work / "teacher"
    if study["teacher"] and args.teacher is None:
        if not args.summarize:
            seconds["teacher"] = opd_train(study["teacher"], teacher_run, [])
        args.teacher = teacher_run / "student"
    if study["teacher"]:
        results["teacher"] = run_summary(teacher_run)
        results["base_pass1"] = results["teacher"]["pass1_by_step"][0]
        if "tool_call_rate_by_step" in results["teacher"]:
            results["base_tool_call_rate"] = results["teacher"]["tool_call_rate_by_step"][0]
    disc = work / "discriminator"
    if study.get("discriminator"):
        if not disc.exists():
            seconds["discriminator"] = make_discriminator(study["discriminator"], disc)
        results["discriminator"] = json.loads((disc / "discriminator.json").read_text())
    chosen = args.arms or list(arms)
    results["arms"] = {arm: {} for arm in chosen}
    for seed in args.seeds:  # every arm at a seed before the next seed: a cut-off study is even
        for arm in chosen:
            run = work / f"{arm.replace('+', '-')}-s{seed}"
            recipe, extra = arms[arm] if isinstance(arms[arm], tuple) else (arms[arm], [])
            # no checkpoints or export: only the metrics are kept (the runs take CPU time enough)
            overrides = [
                f"run.seed={seed}",
                "checkpoint.every=0",
                "checkpoint.export_student=false",
            ]
            if study["teacher"]:
                # the untrained student's score is the teacher run's step 0 (same model, same
                # held-out problems and samples): not measured again in every arm
                overrides += [f"teacher.path={args.teacher.resolve()}", "eval.at_start=false"]
            if study.get("discriminator"):
                overrides.append(f"anchor.path={disc}")
            if not args.summarize:
                seconds[run.name] = opd_train(recipe, run, [*overrides, *extra])
            results["arms"][arm][f"seed{seed}"] = run_summary(run)
            raw.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / "metrics.jsonl", raw / f"{run.name}.metrics.jsonl")
            print(f"{run.name}: {results['arms'][arm][f'seed{seed}']}", flush=True)
    if study["teacher"]:
        shutil.copy(teacher_run / "metrics.jsonl", raw / "teacher.metrics.jsonl")
    else:  # every run measured the untrained student at its step 0
        firsts = [r["pass1_by_step"][0] for a in results["arms"].values() for r in a.values()]
        results["base_pass1"] = statistics.fmean(firsts)
    results["settings"] = {"seeds": args.seeds, "recipes": arms, "teacher": study["teacher"]}
    results["wall_seconds"] = seconds
    results["table"] = table(results)
    (ROOT / "benchmarks" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, ROOT / "benchmarks/results" / f"{name}.png")
    print(results["table"])


if __name__ == "__main__":
    main()
