"""A sampler for GSM-Symbolic templates: fresh GSM-style problems whose answers we compute.

A template's `question_annotated` is the question text with placeholders `{var,original}`,
then three sections:

    #init:
    - name = sample(names)                   # a named list from replacements.json
    - $x = range(10, 500, 10)                # `$`: a number
    - k_txt, k_val = range_str(2, 5, 1, numbers)
    #conditions:
    - divides(x * 12, k_val)                 # all must hold, else the sample is redrawn
    #answer: x * 12 // k_val

`answer_annotated` ends in `#### {expr}`, a second formula for the same answer: a sample counts
only if both agree. Expressions are parsed with `ast` and evaluated by a small interpreter that
allows arithmetic, comparisons, `and`/`or`/`not`, `a if c else b`, list/tuple literals and calls
to the functions in `_functions` only; no `eval`. Numbers are exact: `/` gives a Fraction and
decimals such as `0.25` are read as Fractions, so `is_int` and `==` need no tolerance.

Our reading of the helpers (the templates do not define them): `range(a, b, step)` draws like
Python's `range` (b excluded), `arange` likewise over decimals, `range_str(a, b, step, words)`
gives `(words[i-1], i)`, `sample_sequential` a run of consecutive items, `divides(a, b)` is
"b divides a", `ensure_int` rejects a non-integer. Strings such as "1/2" or "0.25" drawn from a
list become numbers (shown as written).
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MAX_TRIES = 5000  # draws per problem before giving up on a template for it
PROBE_TRIES = 20000  # draws a template gets to show it can produce a problem at all
_PLACEHOLDER = re.compile(r"\{\s*([A-Za-z_]\w*)\s*,([^{}]*)\}")
_NUMERIC = re.compile(r"-?\d+(?:\.\d+)?|\d+/\d+")
_ASSIGN = re.compile(r"^\s*-\s*((?:\$?\s*[A-Za-z_]\w*\s*,\s*)*\$?\s*[A-Za-z_]\w*)\s*=(?!=)(.+)$")
_BINOPS: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type, Callable] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ALLOWED = (
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.List,
    ast.Tuple,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.IfExp,
    ast.Call,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
)


class TemplateError(Exception):
    """A template we cannot parse or evaluate, or a draw that fails (divide by zero, ...)."""


@dataclass(frozen=True)
class Template:
    file: str
    id_orig: int
    body: str  # question text with placeholders
    question: str  # the original GSM8K question
    init: tuple[tuple[tuple[str, ...], bool, ast.expr], ...]  # (names, numeric, expression)
    conditions: tuple[ast.expr, ...]
    answer: ast.expr
    final: ast.expr  # the `#### {expr}` of answer_annotated


# ---------------------------------------------------------------- evaluation


def _number(value: Any) -> Any:
    """Exact numbers: int where integral, Fraction otherwise."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    return value


def _is_num(value: Any) -> bool:
    return isinstance(value, int | Fraction) and not isinstance(value, bool)


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    if isinstance(op, ast.Div):
        if not (_is_num(a) and _is_num(b)):
            raise TemplateError(f"cannot divide {a!r} by {b!r}")
        return _number(Fraction(a) / Fraction(b))
    if isinstance(op, ast.Pow):
        if not (_is_num(a) and isinstance(b, int) and abs(b) <= 64 and abs(a) < 10**12):
            raise TemplateError(f"power {a!r} ** {b!r} out of bounds")
        return _number(Fraction(a) ** b)
    fn = _BINOPS.get(type(op))
    if fn is None or not (_is_num(a) and _is_num(b)):
        raise TemplateError(f"{type(op).__name__} of {a!r} and {b!r} is not allowed")
    return _number(fn(a, b))


def evaluate(node: ast.expr, env: dict[str, Any]) -> Any:
    """Evaluate a checked expression (see `check_expr`) in `env`."""
    if isinstance(node, ast.Constant):
        v = node.value
        return Fraction(repr(v)) if isinstance(v, float) else v
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise TemplateError(f"name {node.id!r} is not defined")
        return env[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        items = [evaluate(e, env) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp):
        return _binop(node.op, evaluate(node.left, env), evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        v = evaluate(node.operand, env)
        if isinstance(node.op, ast.Not):
            return not v
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, env)
        for op, right_node in zip(node.ops, node.comparators):
            right = evaluate(right_node, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = (evaluate(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.IfExp):
        return evaluate(node.body if evaluate(node.test, env) else node.orelse, env)
    if isinstance(node, ast.Call):
        return env[node.func.id](*[evaluate(a, env) for a in node.args])
    raise TemplateError(f"{type(node).__name__} is not allowed")


def _functions(rng: random.Random) -> dict[str, Callable]:
    def sample(items: Any, k: int = 1) -> Any:
        items = list(items)
        return rng.choice(items) if k == 1 else rng.sample(items, k)

    def arange(start: Any, stop: Any, step: Any) -> Any:
        count = -(-(Fraction(stop) - Fraction(start)) // Fraction(step))  # ceil
        if count <= 0:
            raise TemplateError(f"empty arange({start}, {stop}, {step})")
        return _number(Fraction(start) + rng.randrange(int(count)) * Fraction(step))

    def range_str(start: int, stop: int, step: int, words: list) -> tuple:
        picks = [i for i in range(start, stop, step) if 1 <= i <= len(words)]
        if not picks:
            raise TemplateError(f"empty range_str({start}, {stop}, {step})")
        i = rng.choice(picks)
        return words[i - 1], i

    def sample_sequential(items: list, k: int) -> list:
        first = rng.randrange(len(items))
        return [items[(first + j) % len(items)] for j in range(k)]

    def ensure_int(x: Any) -> int:
        if not is_int(x):
            raise TemplateError(f"{x} is not an integer")
        return int(x)

    return {
        "sample": sample,
        "range": lambda a, b, s=1: rng.randrange(a, b, s),
        "arange": arange,
        "range_str": range_str,
        "range_list": lambda a, b: list(range(a, min(b, a + 10**4))),
        "sample_sequential": sample_sequential,
        "is_int": is_int,
        "ensure_int": ensure_int,
        "divides": lambda a, b: b != 0 and a % b == 0,
        "int": int,
        "abs": abs,
        "min": min,
        "max": max,
        "round": lambda x, nd=None: _number(round(x, nd)) if nd else round(x),
        "Fraction": lambda x: _number(Fraction(x)),
    }


def is_int(x: Any) -> bool:
    return _is_num(x) and Fraction(x).denominator == 1


FUNCTION_NAMES = frozenset(_functions(random.Random(0)))


# ---------------------------------------------------------------- parsing


def check_expr(node: ast.expr, known: set[str], where: str) -> None:
    """Only allowed syntax, calls to our functions by name, and names already defined."""
    for sub in ast.walk(node):
        if not isinstance(sub, _ALLOWED):
            raise TemplateError(f"{where}: {type(sub).__name__} is not allowed")
        if isinstance(sub, ast.Call) and (
            not isinstance(sub.func, ast.Name) or sub.func.id not in FUNCTION_NAMES or sub.keywords
        ):
            raise TemplateError(f"{where}: call {ast.unparse(sub.func)}(...) is not allowed")
        if isinstance(sub, ast.Name) and sub.id not in known and sub.id not in FUNCTION_NAMES:
            raise TemplateError(f"{where}: name {sub.id!r} is not defined")


def _expr(source: str, known: set[str], where: str) -> ast.expr:
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as err:
        raise TemplateError(f"{where}: cannot parse {source.strip()!r} ({err.msg})") from None
    check_expr(node, known, where)
    return node


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*#(init|conditions|answer)\s*:(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = [m.group(2)] if m.group(2).strip() else []
        elif current and line.strip():
            out[current].append(line)
    return out


def parse_template(raw: dict, lists: dict[str, list]) -> Template:
    """A Template from one TOML dict (with `file`); TemplateError if we cannot run it."""
    where = raw.get("file", "?")
    text = raw["question_annotated"]
    head, sep, _ = text.partition("#init")
    parts = _sections(text)
    if not sep or "answer" not in parts:
        raise TemplateError(f"{where}: no #init or #answer section")
    known, init = set(lists), []
    for line in parts["init"]:
        m = _ASSIGN.match(line)
        if not m:
            raise TemplateError(f"{where}: cannot read init line {line.strip()!r}")
        lhs = [v.strip() for v in m.group(1).split(",")]
        node = _expr(m.group(2), known, f"{where} init")
        names = tuple(v.lstrip("$").strip() for v in lhs)
        init.append((names, any(v.startswith("$") for v in lhs), node))
        known.update(names)
    conditions = tuple(
        _expr(re.sub(r"^\s*-", "", c, count=1), known, f"{where} condition")
        for c in parts.get("conditions", [])
    )
    answer = _expr(" ".join(parts["answer"]), known, f"{where} answer")
    finals = re.findall(r"####\s*\{(.+)\}\s*$", raw["answer_annotated"].strip())
    if len(finals) != 1:
        raise TemplateError(f"{where}: answer_annotated has no final '#### {{expr}}'")
    final = _expr(finals[0], known, f"{where} final answer")
    missing = {m.group(1) for m in _PLACEHOLDER.finditer(head)} - known
    if missing:
        raise TemplateError(f"{where}: placeholders {sorted(missing)} are never assigned")
    return Template(
        where,
        int(raw["id_orig"]),
        head.strip(),
        raw["question"].strip(),
        tuple(init),
        conditions,
        answer,
        final,
    )


# ---------------------------------------------------------------- sampling


def _plain(value: Any) -> str:
    if isinstance(value, Fraction):
        return _decimal(value) or f"{value.numerator}/{value.denominator}"
    return str(value)


def _show(value: Any) -> str:
    """As GSM8K writes numbers: `400,000` from 10,000 up, `2250` below."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return _plain(value)


def _decimal(value: Any) -> str | None:
    """`7/2` -> `3.5`; None if the decimal expansion does not end (within 6 digits)."""
    value = Fraction(value)
    for digits in range(7):
        scaled = value * 10**digits
        if scaled.denominator == 1:
            s = f"{abs(scaled.numerator):0{digits + 1}d}"
            text = s if digits == 0 else f"{s[:-digits]}.{s[-digits:]}"
            return ("-" if value < 0 else "") + text
    return None


_SENTENCE_START = re.compile(r"(?:\A|[.!?][\"')]?\s+|\n\s*)\Z")


def render(template: Template, shown: dict[str, str]) -> str:
    """The question with every placeholder filled; a value opening a sentence is capitalised."""

    def fill(m: re.Match) -> str:
        value = shown[m.group(1)]
        if _SENTENCE_START.search(template.body, 0, m.start()):
            value = value[:1].upper() + value[1:]
        return value

    return _PLACEHOLDER.sub(fill, template.body)


def _assign(names: tuple[str, ...], numeric: bool, value: Any, env: dict, shown: dict) -> None:
    values = [value] if len(names) == 1 else list(value)
    if len(values) != len(names):
        raise TemplateError(f"cannot unpack {len(values)} values into {names}")
    for name, v in zip(names, values):
        if isinstance(v, str) and _NUMERIC.fullmatch(v.strip()):
            shown[name], v = v.strip(), _number(Fraction(v.strip()))
        elif numeric and not _is_num(v):
            raise TemplateError(f"${name} got {v!r}, not a number")
        else:
            shown[name] = _show(v)
        env[name] = v


def draw(template: Template, lists: dict[str, list], rng: random.Random) -> dict | None:
    """One attempt: `{"question", "answer", "values"}` (the variables, exact), or None
    if a condition fails, the two answer formulas disagree, or the draw breaks."""
    env: dict[str, Any] = {**lists, **_functions(rng)}
    shown: dict[str, str] = {}
    try:
        for names, numeric, node in template.init:
            _assign(names, numeric, evaluate(node, env), env, shown)
        if not all(evaluate(c, env) for c in template.conditions):
            return None
        answer, final = evaluate(template.answer, env), evaluate(template.final, env)
    except (TemplateError, ArithmeticError, TypeError, ValueError, IndexError):
        return None
    if not _is_num(answer) or answer != final or _decimal(answer) is None:
        return None
    question = render(template, shown)
    if question == template.question:  # the test question itself
        return None
    values = {name: _plain(env[name]) for name in shown}  # exact, for checks and provenance
    return {"question": question, "answer": _decimal(answer), "values": values}


def sample_problem(
    template: Template, lists: dict[str, list], rng: random.Random, tries: int = MAX_TRIES
) -> dict | None:
    for _ in range(tries):
        got = draw(template, lists, rng)
        if got is not None:
            return {**got, "template": template.file, "id_orig": template.id_orig}
    return None


def usable_templates(
    raws: list[dict], lists: dict[str, list]
) -> tuple[list[Template], dict[str, str]]:
    """Templates that parse and yield a problem within PROBE_TRIES draws; the rest with reasons."""
    usable, skipped = [], {}
    for raw in raws:
        try:
            t = parse_template(raw, lists)
        except TemplateError as err:
            skipped[raw.get("file", "?")] = str(err)
            continue
        if sample_problem(t, lists, random.Random(f"probe:{t.file}"), PROBE_TRIES) is None:
            skipped[t.file] = f"no valid draw in {PROBE_TRIES} tries"
        else:
            usable.append(t)
    return usable, skipped


def generate(usable: list[Template], lists: dict[str, list], n: int, seed: int) -> list[dict]:
    """n problems; problem i uses template order[i % len] and a generator seeded by (seed, i)."""
    if not usable:
        raise TemplateError("no usable templates")
    order = sorted(usable, key=lambda t: t.file)
    random.Random(f"order:{seed}").shuffle(order)
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        for shift in range(len(order)):
            got = sample_problem(order[(i + shift) % len(order)], lists, rng)
            if got is not None:
                out.append(got)
                break
        else:
            raise TemplateError(f"no template yielded problem {i} (seed {seed})")
    return out
