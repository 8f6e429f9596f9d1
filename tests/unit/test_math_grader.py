"""Answer extraction, math equivalence through math_verify, timeouts, and the reward registry."""

from __future__ import annotations

import threading
import time

import pytest

from opd.eval.benchmarks import Problem
from opd.rewards.math import (
    extract_answer,
    math_equal,
    normalize_answer,
    run_with_deadline,
    too_big,
)
from opd.rewards.registry import (
    REWARDS,
    call_with_timeout,
    get_reward,
    math_correct,
    register_reward,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{\\frac{1}{\\sqrt{2}}} then \\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
        ("\\boxed{\\left\\{1, 2\\right\\}}.", "\\left\\{1, 2\\right\\}"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{(1, 2)}", "(1, 2)"),
        ("\\boxed{42} and an unclosed \\boxed{7", "42"),
        ("empty \\boxed{} then 12", "12"),
        ("so\n#### 1,234\n", "1234"),
        ("#### \\$18.00", "18.00"),
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Thus the answer is 18 dollars.", "18"),
        ("the final answer is: 10%", "10"),
        ("The answer is 2 pi", "2 pi"),
        ("The answer is 3x", "3x"),
        ("we get 3 apples, then 4.5 pears.", "4.5"),
        ("Total: 1,234,567.89 units", "1234567.89"),
        ("it is -3.", "-3"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred,ref",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\dfrac{1}{2}"),
        ("\\frac12", "0.5"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("x=3", "3"),
        ("(1,2]", "(1, 2]"),
        ("[-1, \\infty)", "[-1,\\infty)"),
        ("18.00", "18"),
        ("5 \\text{ cm}", "5"),
        ("2^{100}", "1267650600228229401496703205376"),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\text{(C)}", "C"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
    ],
)
def test_math_equal_accepts_equivalent_forms(pred, ref):
    assert math_equal(pred, ref)


@pytest.mark.parametrize(
    "pred,ref",
    [
        ("3", "4"),
        ("0.33", "\\frac{1}{3}"),
        ("[1,2)", "(1,2)"),
        ("\\sqrt{3}", "\\sqrt{2}"),
        ("2.0000001", "2"),
        ("x=4", "3"),
        (None, "3"),
        ("3", None),
        ("", "3"),
        ("\\frac{", "1"),
    ],
)
def test_math_equal_rejects_different_answers(pred, ref):
    assert not math_equal(pred, ref)


def test_normalize_answer():
    assert normalize_answer(" 1{,}000.50 ") == "1000.5"
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("\\frac{1}{2}")
    assert normalize_answer("-0.0") == "0"


def test_huge_powers_are_refused_not_computed():
    t0 = time.perf_counter()
    assert not math_equal("10^{10^{10}}", "2", timeout_s=2)
    assert not math_equal("2", "9^{9^{9}}", timeout_s=2)
    assert not math_equal("(10^{7})!", "3", timeout_s=2)
    assert time.perf_counter() - t0 < 5
    import sympy

    assert too_big(sympy.Pow(10, sympy.Pow(10, 10, evaluate=False), evaluate=False))
    assert not too_big(sympy.Integer(2) ** 100)


def test_run_with_deadline_stops_a_busy_python_loop():
    stop_seen = []

    def spin():
        try:
            while True:
                pass
        except BaseException:
            stop_seen.append(True)
            raise

    t0 = time.perf_counter()
    assert run_with_deadline(spin, (), 0.3) == (False, None)
    assert time.perf_counter() - t0 < 2
    deadline = time.time() + 5
    while not stop_seen and time.time() < deadline:
        time.sleep(0.01)
    assert stop_seen, "the worker thread was not stopped"
    assert run_with_deadline(lambda a, b: a + b, (2, 3), 1) == (True, 5)
    with pytest.raises(KeyError):
        run_with_deadline(lambda: {}["x"], (), 1)


def test_math_equal_works_outside_the_main_thread():
    """math_verify's signal-based timeouts would raise here; ours must not."""
    out = []
    worker = threading.Thread(target=lambda: out.append(math_equal("\\sqrt{8}", "2\\sqrt{2}")))
    worker.start()
    worker.join(30)
    assert out == [True]


def test_math_correct_on_dicts_and_problems():
    row = {"id": "t/1", "answer": "\\frac{1}{2}"}
    assert math_correct(row, "so the answer is \\boxed{0.5}") == 1.0
    assert math_correct(row, "so the answer is \\boxed{0.6}") == 0.0
    assert math_correct(row, "I don't know") == 0.0
    problem = Problem(id="p/1", benchmark="p", prompt="?", answer="1000")
    assert get_reward("math_correct")(problem, "#### 1,000") == 1.0
    with pytest.raises(ValueError, match="t/2"):
        math_correct({"id": "t/2"}, "\\boxed{1}")


def test_registry_names_and_lazy_code_reward():
    assert {"math_correct", "code_tests_passed"} <= set(REWARDS)
    with pytest.raises(ValueError, match="code_tests_passed, math_correct"):
        get_reward("nope")
    assert callable(get_reward("code_tests_passed"))  # imports opd.rewards.code only when called
    with pytest.raises(ValueError, match="already"):
        register_reward("math_correct", lambda r, c: 0.0)
    register_reward("always_one", lambda r, c: 1.0)
    try:
        assert get_reward("always_one")({}, "") == 1.0
    finally:
        REWARDS.pop("always_one")


def test_call_with_timeout():
    slow = lambda record, completion: time.sleep(0.5) or 1.0
    t0 = time.perf_counter()
    assert call_with_timeout(slow, {}, "", timeout_s=0.05) == 0.0
    assert time.perf_counter() - t0 < 0.4
    assert call_with_timeout(math_correct, {"answer": "2"}, "\\boxed{2}", timeout_s=30) == 1.0
    with pytest.raises(ValueError):
        call_with_timeout(math_correct, {}, "\\boxed{2}", timeout_s=30)


@pytest.mark.parametrize(
    "reference, completion, want",
    [
        ("first 7 plus 7 equals 14. so the answer is 14.", "so the answer is 14.", 1.0),
        ("first 7 plus 7 equals 14. so the answer is 14.", "the answer is 7", 0.0),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "She sold \\boxed{72}", 1.0),
        ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),  # a bare answer is not cut to its last number
        ("\\frac{1}{2}", "\\boxed{2}", 0.0),
    ],
)
def test_math_correct_reads_a_worked_reference_by_its_final_answer(reference, completion, want):
    from opd.rewards.registry import math_correct

    assert math_correct({"id": "r", "answer": reference}, completion) == want
