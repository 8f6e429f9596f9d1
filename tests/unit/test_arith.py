"""The generated arithmetic problems: answers right, splits disjoint, lists that extend."""

import json
import re

from opd.eval.arith import arith_problems
from opd.rewards.registry import math_correct

WORK = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\. The answer is \\boxed\{(\d+)\}\.")


def test_answers_follow_from_the_question():
    for row in arith_problems(300, "train") + arith_problems(100, "heldout"):
        a, op, b, result, boxed = WORK.fullmatch(row["solution"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert value == int(result) == int(boxed) == int(row["answer"]), row
        assert a in row["question"] and b in row["question"], row
        assert math_correct(row, row["solution"]) == 1.0
        assert math_correct(row, f"The answer is {value + 1}.") == 0.0


def test_splits_never_share_a_question_and_lists_extend():
    train, heldout = arith_problems(2000, "train"), arith_problems(256, "heldout")
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    assert len({r["question"] for r in train}) == 2000
    assert arith_problems(50, "train") == train[:50]
    assert len({r["id"] for r in train + heldout}) == 2256


def test_registry_train_rows_carry_the_benchmark_instruction(tmp_path, monkeypatch):
    from opd.data.sources import resolve_data
    from opd.eval.benchmarks import load_benchmark
    from opd.eval.runner import MATH_SUFFIX, problem_messages

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    lines = resolve_data("registry:arith-train").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2000
    assert rows[0]["question"] == arith_problems(1, "train")[0]["question"] + MATH_SUFFIX
    held = load_benchmark("arith-heldout", limit=1)[0]
    assert problem_messages(held)[0]["content"].endswith(MATH_SUFFIX)
