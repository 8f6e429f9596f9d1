"""Every recipe key with its type, default and meaning, read from the schema itself.

The meaning is the comment on the field's line, or the comment lines right above it, in the
dataclass's source (`opd/config/schema.py` and the blocks it imports), so the reference cannot
drift from the code: `opd recipe keys` prints it and `docs/recipes.md` is its output (a test
compares them).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from dataclasses import MISSING, dataclass
from functools import cache

from omegaconf import MISSING as OMEGA_MISSING

from opd.config.schema import Config


@dataclass
class Key:
    key: str
    type: str
    default: str
    meaning: str


@cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment, from the class's source."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if not name.isidentifier() or ":" not in stripped or not line.startswith("    "):
            continue
        if line.startswith("     ") or stripped.startswith(("def ", "return", "if ")):
            continue
        above, n = [], number - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, by_line.get(n, ""))
            n -= 1
        text = " ".join(x for x in [*above, by_line.get(number, "")] if x)
        out[name] = text
    return out


def _type_name(hint) -> str:
    text = str(hint).replace("typing.", "")
    if isinstance(hint, type):
        text = hint.__name__
    return text.replace("opd.config.schema.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is OMEGA_MISSING or value == "???":
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def keys(cls: type = Config, prefix: str = "") -> list[Key]:
    """The keys of `cls` (a schema dataclass), blocks expanded, in declaration order."""
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):  # a block's own comments over its base's
        if dataclasses.is_dataclass(base):
            comments.update({k: v for k, v in _comments(base).items() if v})
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            out += keys(hint, name + ".")
            continue
        args = typing.get_args(hint)
        if args and dataclasses.is_dataclass(args[0]):  # a list of blocks (teachers)
            meaning = comments.get(f.name, "")
            out.append(Key(name, f"list of {args[0].__name__}", "[]", meaning))
            continue
        out.append(Key(name, _type_name(hint), _default(f), comments.get(f.name, "")))
    return out


def markdown() -> str:
    rows = keys()
    blocks: dict[str, list[Key]] = {}
    for k in rows:
        blocks.setdefault(k.key.split(".", 1)[0], []).append(k)
    out = [
        "# Recipe keys",
        "",
        "Generated from the schema by `opd recipe keys` (`opd/config/reference.py`); a test",
        "keeps this file equal to its output. `teachers:` is a list of `teacher` blocks.",
        "",
    ]
    for block, items in blocks.items():
        out += [f"## `{block}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in items:
            kind, default, cell = (x.replace("|", "\\|") for x in (k.type, k.default, k.meaning))
            out.append(f"| `{k.key}` | `{kind}` | `{default}` | {cell} |")
        out.append("")
    return "\n".join(out)
