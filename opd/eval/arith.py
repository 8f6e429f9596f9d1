"""One-step arithmetic word problems: a task a 135M model can learn on a CPU in minutes.

SmolLM2-135M-Instruct solves few GSM8K problems (its sampled pass@1 there is near zero), so a
comparison of reward-driven objectives on it would compare noise. These problems (a person
has, gets, gives away, or buys in boxes) have one operation on small numbers, a reference
solution of one line, and an integer answer: the base model solves some, a teacher fine-tuned
on the solutions solves most, and the gap between them is what the objectives close.

The problems are one deterministic list; a problem goes to the held-out split when a hash of
its question says so (one in eight), so the splits never share a question, and a longer list
extends a shorter one (problem i depends only on i).
"""

from __future__ import annotations

import hashlib
import random

NAMES = "Sam Mia Leo Ava Noah Zoe Omar Lena Ravi Ines Theo Yuki Ben Lily Max Nora".split()
THINGS = "apples books coins stickers marbles pencils cards shells stamps buttons".split()
HELDOUT_EVERY = 8  # one problem in eight is held out


def _problem(rng: random.Random) -> tuple[str, int, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(("gets", "gives", "boxes"))
    if kind == "gets":
        a, b = rng.randint(3, 60), rng.randint(3, 60)
        q = (
            f"{name} has {a} {thing}. {name} gets {b} more {thing}. "
            f"How many {thing} does {name} have now?"
        )
        return q, a + b, f"{a} + {b}"
    if kind == "gives":
        a = rng.randint(10, 90)
        b = rng.randint(2, a - 1)
        q = (
            f"{name} has {a} {thing}. {name} gives {b} {thing} to a friend. "
            f"How many {thing} does {name} have left?"
        )
        return q, a - b, f"{a} - {b}"
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    q = (
        f"{name} buys {a} boxes of {thing}. Each box holds {b} {thing}. "
        f"How many {thing} does {name} buy?"
    )
    return q, a * b, f"{a} * {b}"


def _held_out(question: str) -> bool:
    return hashlib.sha256(question.encode()).digest()[0] % HELDOUT_EVERY == 0


def tool_solution(expr: str, answer: int) -> list[dict]:
    """The worked solution as a conversation that calls the python tool (`agent:` recipes):
    a python block that prints the result, the tool's output, then the answer."""
    return [
        {"role": "assistant", "content": f"```python\nprint({expr})\n```\n"},
        {"role": "tool", "content": str(answer)},
        {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."},
    ]


def arith_problems(n: int, split: str, seed: int = 0) -> list[dict]:
    """The first `n` distinct problems of `split` ("train" or "heldout"): rows of `id`,
    `question`, `answer` (the integer, as text) and `solution` (a worked line ending in
    `\\boxed{answer}`) and `tool_solution` (the same as a conversation calling python)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    i = 0
    while len(rows) < n:
        question, answer, expr = _problem(rng)
        i += 1
        if question in seen or _held_out(question) != (split == "heldout"):
            continue
        seen.add(question)
        rows.append(
            {
                "id": f"arith-{split}/{seed}-{i - 1}",
                "question": question,
                "answer": str(answer),
                "solution": f"{expr} = {answer}. The answer is \\boxed{{{answer}}}.",
                "tool_solution": tool_solution(expr, answer),
            }
        )
    return rows
