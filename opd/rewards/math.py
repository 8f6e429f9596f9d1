"""Math answers: pull the final answer out of a completion, and compare it with a reference.

`extract_answer` takes, in order of preference: the last `\\boxed{...}` (braces balanced, nesting
allowed), the last `#### x` line, the last "answer is x", and the last number in the text.

`math_equal` first compares normalised strings (cheap, exact), then asks `math_verify` (sympy)
whether the two are the same mathematical object: `\\frac{1}{2}` = `0.5` = `1/2`, `x=3` = `3`,
`(1,2]` as an interval, `1,000` = `1000`, and so on.

Timeouts. math_verify's own timeouts use `signal.alarm`, which only works in the main thread and
raises ValueError elsewhere (rollout and reward code often runs in worker threads). We switch them
off and run each comparison in a daemon thread instead (`run_with_deadline`): the caller waits at
most `timeout_s`; on a timeout the worker is sent an asynchronous exception
(`PyThreadState_SetAsyncExc`), which stops sympy at its next Python bytecode. A single long C-level
operation (e.g. a huge integer power) cannot be interrupted this way, and holds the GIL until it
ends; only a separate process could bound that, at a much higher cost per call.
"""

from __future__ import annotations

import ctypes
import math
import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

MAX_ANSWER_CHARS = 512  # longer "answers" are rejected before sympy sees them
MAX_BITS = 1 << 16  # numbers that would need more bits are not compared (see `too_big`)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:(?:,|\{,\})\d{3})+)(?![\d])")
_LEADING_NUMBER = re.compile(r"(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*([A-Za-z%][\w%/ ]*)?")
_NOT_UNITS = {"pi", "sqrt", "and", "or", "plus", "minus", "times", "over", "to", "i", "e"}


class DeadlineExceeded(BaseException):
    """Sent into a worker thread to stop it; a BaseException so `except Exception` can't eat it."""


# ---------------------------------------------------------------- extraction


def _boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}`, braces balanced; an unclosed one is skipped."""
    found = []
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i])
                    break
    return found


def strip_thousands(s: str) -> str:
    """`1,000,000` and `1{,}000` -> `1000000`; a list like `1, 2` is left alone."""
    return _THOUSANDS.sub(lambda m: m.group(1) + re.sub(r"\{?,\}?", "", m.group(2)), s)


def _is_unit(tail: str | None) -> bool:
    """`dollars`, `cm`, `%` after a number are units; `x`, `pi`, `and 3` are not."""
    if not tail:
        return True
    word = tail.split()[0].lower()
    return word == "%" or (len(word) >= 2 and word not in _NOT_UNITS)


def _clean(s: str) -> str | None:
    """Trim math delimiters, a trailing period, currency signs; `18 dollars` -> `18`."""
    s = s.strip()
    math = re.search(r"\$([^$]+)\$", s)
    if math:
        s = math.group(1)
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\\$\s*", "", s)
    s = re.sub(r"[.。]+$", "", s).strip()
    m = _LEADING_NUMBER.fullmatch(s)
    if m and _is_unit(m.group(2)):
        s = m.group(1)
    s = strip_thousands(s)
    return s or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None if it has none we can find."""
    if not text:
        return None
    boxed = [b for b in _boxed_contents(text) if b.strip()]
    if boxed:
        return _clean(boxed[-1])
    for pattern in (_HASHES, _ANSWER_IS):
        hits = pattern.findall(text)
        if hits:
            cleaned = _clean(hits[-1])
            if cleaned:
                return cleaned
    numbers = _NUMBER.findall(text)
    return strip_thousands(numbers[-1]) if numbers else None


def final_answer(reference: str) -> str:
    """A reference's answer: the final answer of a worked solution (a `\\boxed{}`, a `####`
    line, "answer is"), else the reference as it is."""
    marked = _boxed_contents(reference) or _HASHES.search(reference) or _ANSWER_IS.search(reference)
    if marked:
        return extract_answer(reference) or reference
    return reference


# ---------------------------------------------------------------- normalisation


def normalize_answer(s: str) -> str:
    """A canonical string: equal strings are surely equal answers (the converse need not hold)."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\[,!;: ]|\\displaystyle", "", s)
    s = strip_thousands(s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    try:
        d = Decimal(s)
    except (InvalidOperation, ValueError):
        return s
    if not d.is_finite():
        return s
    d = d.normalize()
    return format(d, "f") if d != 0 else "0"


# ---------------------------------------------------------------- deadlines


def _stop_thread(thread: threading.Thread) -> None:
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(DeadlineExceeded)
    )
    if hit > 1:  # should not happen; undo rather than hit other threads
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)


def run_with_deadline(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[bool, Any]:
    """`(True, fn(*args))` if it returns within `timeout_s`, else `(False, None)`.

    `fn` runs in a daemon thread (works from any thread, unlike signal.alarm). An exception
    raised by `fn` is re-raised here. On a timeout the thread is asked to stop (see the module
    docstring for what that can and cannot interrupt) and is not waited for.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except DeadlineExceeded:
            pass
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, name="opd-deadline", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _stop_thread(thread)
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box.get("value")


# ---------------------------------------------------------------- math_verify


def _silence_timeout_warning() -> None:
    """math_verify warns once that its timeouts are off; we enforce our own, so say it was shown."""
    import math_verify.grader
    import math_verify.parser

    for mod in (math_verify.grader, math_verify.parser):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True


def _parse(s: str) -> list:
    from math_verify import parse

    wrapped = s if ("$" in s or "\\boxed" in s) else f"${s}$"
    parsed = parse(wrapped, parsing_timeout=None)
    if not any(not isinstance(p, str) for p in parsed):
        raw = parse(s, parsing_timeout=None)  # plain-text forms such as `2**10`
        parsed = raw or parsed
    return parsed


@lru_cache(maxsize=4096)
def _parse_gold(ref: str) -> tuple:
    return tuple(_parse(ref))


def _log2_size(node: Any) -> float | None:
    """An upper bound on log2|value| of a numeric sympy tree, None where we cannot tell."""
    import sympy

    if isinstance(node, sympy.Integer):
        return float(abs(int(node)).bit_length())
    if isinstance(node, sympy.Rational):
        return float(max(abs(node.p).bit_length(), abs(node.q).bit_length()))
    if isinstance(node, sympy.Float):
        return math.log2(abs(float(node)) + 2.0)
    if isinstance(node, sympy.factorial):
        n = _log2_size(node.args[0])
        return None if n is None else _times(_pow2(n), n)
    if isinstance(node, sympy.Pow):
        base, exp = (_log2_size(a) for a in node.args)
        return None if base is None or exp is None else _times(base, _pow2(exp))
    if isinstance(node, (sympy.Mul, sympy.Add)):
        parts = [_log2_size(a) for a in node.args]
        return None if None in parts else sum(parts) + 1.0
    return None


def _pow2(x: float) -> float:
    return math.inf if x > 1000 else 2.0**x


def _times(a: float, b: float) -> float:
    return 0.0 if a == 0 or b == 0 else a * b


def too_big(expr: Any) -> bool:
    """Whether evaluating `expr` could build a number over MAX_BITS bits (e.g. `10^{10^{10}}`).

    sympy computes such powers as one C-level integer operation that holds the GIL: neither a
    signal nor a thread deadline can stop it, so we refuse to compare them at all.
    """
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.Pow, sympy.factorial)):
            size = _log2_size(node)
            if size is not None and size > MAX_BITS:
                return True
    return False


def _verify(pred: str, ref: str) -> bool:
    from math_verify import verify

    gold = list(_parse_gold(ref))
    target = _parse(pred)
    if not gold or not target or any(too_big(x) for x in gold + target):
        return False
    return bool(verify(gold, target, timeout_seconds=None))


def math_equal(pred: str | None, ref: str | None, timeout_s: float = 5) -> bool:
    """Whether `pred` is mathematically the same answer as `ref`; False on error or timeout."""
    if pred is None or ref is None:
        return False
    pred, ref = str(pred).strip(), str(ref).strip()
    if not pred or not ref:
        return False
    if normalize_answer(pred) == normalize_answer(ref):
        return True
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    _silence_timeout_warning()
    try:
        done, same = run_with_deadline(_verify, (pred, ref), timeout_s)
    except Exception:
        return False
    return bool(done and same)
