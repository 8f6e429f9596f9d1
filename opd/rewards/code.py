"""Code rewards: build a HumanEval-style test program from a completion and run it sandboxed.

A record needs a prompt (``prefix`` or ``prompt``), tests (``tests`` or ``test``: a string that
defines ``check(candidate)``, or a list of assert lines) and, for ``check`` tests, an
``entry_point``; it may be a dict or any object with those attributes.

The completion may be a bare function body (it continues the prompt), a full definition of the
entry point, or either inside a fenced ```python block (the block is used). A full definition
replaces the prompt's stub but keeps the prompt's imports and helper functions.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from opd.rewards.sandbox import run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_IMPORT = re.compile(r"^(?:import|from)\s.*$", re.M)


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The fenced code block (the one defining ``entry_point`` if several), else the text."""
    blocks = [b for b in _FENCE.findall(completion) if b.strip()]
    if not blocks:
        return completion
    defining = [b for b in blocks if entry_point and _defines(b, entry_point)]
    return (defining or blocks)[0]


def _defines(code: str, name: str) -> bool:
    """A top-level (unindented) definition of `name`; an indented one is a nested helper."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _prompt_context(prompt: str, entry_point: str) -> str:
    """The prompt's imports and helpers, without its stub of ``entry_point``."""
    source = prompt + "\n    pass\n"  # close the stub so the prompt parses
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return "\n".join(_IMPORT.findall(prompt))
    lines = source.splitlines()
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry_point:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        keep.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n\n".join(keep)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """prompt + completion (or the completion's own definition) + tests + ``check(entry)``."""
    code = extract_code(completion, entry_point)
    top_level_def = code.lstrip("\n").startswith(("def ", "async def "))
    if entry_point and (_defines(code, entry_point) or top_level_def):
        program = f"{_prompt_context(prompt, entry_point)}\n\n{code}"
    else:
        program = prompt + code
    call = f"check({entry_point})\n" if entry_point and "def check(" in test else ""
    return f"{program}\n\n\n{test}\n\n{call}"


def _field(record: Any, *names: str) -> Any:
    for name in names:
        value = record.get(name) if isinstance(record, dict) else getattr(record, name, None)
        if value is not None:
            return value
    return None


def code_reward(record: Any, completion: str, timeout_s: float = 10.0) -> float:
    """1.0 if the completion passes the record's tests in the sandbox, else 0.0."""
    tests = _field(record, "tests", "test")
    if tests is None:
        raise ValueError("code_reward needs a record with `tests` or `test`")
    if not isinstance(tests, str):
        tests = "\n".join(tests)
    prompt = _field(record, "prefix", "prompt") or ""
    program = humaneval_program(prompt, completion, tests, _field(record, "entry_point") or "")
    return 1.0 if run_python(program, timeout_s=timeout_s).ok else 0.0
