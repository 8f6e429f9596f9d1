"""simct vs shared_only on the real pair (Gemma-3-270M -> SmolLM2-135M-Instruct), same prompts,
seeds and budget: the fraction of completion tokens each mode supervises, and the held-out
aligned KL (the virtual-vocabulary KL over every segment, whichever the mode trains on).

    python benchmarks/simct_modes.py [--steps 8] [--out benchmarks/simct_modes.json]

Runs `recipes/simct/gemma3-270m_to_smollm2-135m.yaml` once per mode (CPU: ~10 min each).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "recipes/simct/gemma3-270m_to_smollm2-135m.yaml"


def run_mode(mode: str, steps: int, out: Path) -> dict:
    from opd.config import load_config
    from opd.loop import train
    from opd.metrics import read_metrics

    cfg = load_config(
        RECIPE,
        [
            f"run.output_dir={out / mode}",
            "run.resume=false",
            "run.progress=false",
            f"objective.params.mode={mode}",
            f"trainer.steps={steps}",
            f"eval.every={steps // 2}",
            "checkpoint.every=0",
            "checkpoint.export_student=false",
        ],
    )
    t0 = time.time()
    train(cfg)
    rows = read_metrics(out / mode / "metrics.jsonl")
    train_rows = [r for r in rows if r["step"] > 0]

    def mean(key: str) -> float:
        return sum(r[key] for r in train_rows) / len(train_rows)

    one, span = mean("simct/one_to_one_tokens"), mean("simct/span_tokens")
    return {
        "mode": mode,
        "steps": steps,
        "wall_s": time.time() - t0,
        "supervised_fraction": one if mode == "shared_only" else one + span,
        "one_to_one_fraction": one,
        "span_fraction": span,
        "dropped_fraction": mean("simct/dropped_tokens"),
        "heldout_aligned_kl": {
            r["step"]: r["heldout/simct/aligned_kl"]
            for r in rows
            if "heldout/simct/aligned_kl" in r
        },
        "heldout_kl_one_to_one": {
            r["step"]: r["heldout/simct/kl_one_to_one"]
            for r in rows
            if "heldout/simct/kl_one_to_one" in r
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("runs/simct-modes"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "simct_modes.json")
    args = parser.parse_args()
    import torch

    results = [run_mode(m, args.steps, args.work) for m in ("simct", "shared_only")]
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "recipe": str(RECIPE.relative_to(RECIPE.parents[2])),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    head = f"{'mode':<12} {'supervised':>10} {'1:1':>6} {'spans':>6} {'dropped':>8}"
    print(head + "  heldout aligned KL")
    for r in results:
        kl = " -> ".join(f"{v:.3f}" for v in r["heldout_aligned_kl"].values())
        print(
            f"{r['mode']:<12} {r['supervised_fraction']:>10.3f} {r['one_to_one_fraction']:>6.3f} "
            f"{r['span_fraction']:>6.3f} {r['dropped_fraction']:>8.3f}  {kl}"
        )


if __name__ == "__main__":
    main()
