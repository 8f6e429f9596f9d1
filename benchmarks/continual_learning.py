"""Continual learning: SFT vs SDFT learning fictional facts, and what each forgets.

    python benchmarks/continual_learning.py --steps 16 --out benchmarks/continual_learning.json

SmolLM2-135M-Instruct (registry weights) learns generated facts about fictional countries
from one demonstration sentence each, once with `sft` (cross-entropy on the demonstration)
and once with `sdft` (EMA self-teacher that sees the demonstration), same steps and learning
rate. New-task accuracy: greedy answers containing the fact's object, for the training
question (strict) and for an unseen paraphrase. Prior ability: bits per byte of real text
nobody here wrote, HumanEval canonical solutions and GSM8K reference solutions (first 40).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

SYLLABLES = "zar von qua mir tel os ka ren dol vish am bru ne tor sil gav ek lum".split()
CITIES = "port haven ford stead mouth gate fall bridge".split()
ANIMALS = "lynx heron otter falcon ibex marten crane badger".split()


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_facts(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    facts, seen = [], set()
    while len(facts) < n:
        country = _name(rng, 3) + "ia"
        if country in seen:
            continue
        seen.add(country)
        if len(facts) % 2 == 0:
            obj = _name(rng, 2) + rng.choice(CITIES)
            facts.append(
                {
                    "id": f"fact/{len(facts)}",
                    "object": obj,
                    "question": f"What is the capital of {country}?",
                    "paraphrase": f"Which city is the seat of government of {country}?",
                    "answer": f"The capital of {country} is {obj}.",
                }
            )
        else:
            obj = rng.choice(ANIMALS)
            facts.append(
                {
                    "id": f"fact/{len(facts)}",
                    "object": obj,
                    "question": f"What is the national animal of {country}?",
                    "paraphrase": f"Which animal is the national symbol of {country}?",
                    "answer": f"The national animal of {country} is the {obj}.",
                }
            )
    return facts


@torch.no_grad()
def recall(model_dir: str, facts: list[dict], field: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = 0
    for f in facts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": f[field]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += f["object"].lower() in text.lower()
    return hits / len(facts)


@torch.no_grad()
def bits_per_byte(model_dir: str, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nats, nbytes = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"][:, :1024]
        logits = model(ids).logits[0, :-1].float()
        nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        nbytes += len(tok.decode(ids[0, 1:]).encode())
    return nats / math.log(2) / nbytes


def prior_texts() -> dict[str, list[str]]:
    from opd.eval.benchmarks import load_benchmark

    code = [p.prompt + p.meta["canonical_solution"] for p in load_benchmark("humaneval", 40)]
    math_ = [p.prompt + "\n" + p.meta["solution"] for p in load_benchmark("gsm8k-100", 40)]
    return {"humaneval_bpb": code, "gsm8k_bpb": math_}


def scores(model_dir: str, facts: list[dict], texts: dict[str, list[str]]) -> dict[str, float]:
    out = {
        "strict": recall(model_dir, facts, "question"),
        "paraphrase": recall(model_dir, facts, "paraphrase"),
    }
    out.update({k: bits_per_byte(model_dir, v) for k, v in texts.items()})
    return out


def run(method: str, data: Path, out_dir: Path, steps: int, lr: float) -> Path:
    from opd.config import load_config
    from opd.loop import train

    recipe = Path(__file__).parents[1] / f"recipes/{method}/smollm2-135m-facts.yaml"
    cfg = load_config(
        recipe,
        [
            f"data.train_path={data}",
            f"run.output_dir={out_dir}",
            f"trainer.steps={steps}",
            f"learner.lr={lr}",
        ],
    )
    return train(cfg) / "student"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--work", type=Path, default=Path("runs/continual_learning"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/continual_learning.json"))
    ap.add_argument(
        "--write-facts",
        type=Path,
        default=None,
        help="only write the facts as jsonl to this file (the facts recipes' data), then stop",
    )
    args = ap.parse_args()
    if args.write_facts:
        facts = make_facts(args.facts)
        args.write_facts.write_text("".join(json.dumps(f) + "\n" for f in facts))
        print(f"{args.write_facts}: {len(facts)} facts")
        return

    from opd.models.sources import resolve_model

    args.work.mkdir(parents=True, exist_ok=True)
    facts = make_facts(args.facts)
    data = args.work / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts))
    texts = prior_texts()
    base = str(resolve_model("registry:smollm2-135m-instruct"))
    results = {"base": scores(base, facts, texts)}
    for method in ("sft", "sdft"):
        student = run(method, data, args.work / method, args.steps, args.lr)
        results[method] = scores(str(student), facts, texts)
    results["settings"] = {"facts": args.facts, "steps": args.steps, "lr": args.lr}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
