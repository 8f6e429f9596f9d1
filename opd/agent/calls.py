"""Finding the tool call a model turn ends with, and the stop strings that end a turn there.

`python_block`: the turn's first fenced ```python block; generation stops at its closing
fence (a newline, three backticks, a newline). `tool_call_tag`: the first
<tool_call>{"name": ..., "arguments": ...}</tool_call>; generation stops at the closing tag.
A turn without a complete call ends the trajectory (the model has answered)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"```python[ \t]*\n(.*?)\n```", re.DOTALL)
_TAG = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
STOPS = {"python_block": ["\n```\n"], "tool_call_tag": ["</tool_call>"]}


@dataclass
class ToolCall:
    name: str
    arguments: object  # the code (python_block) or the JSON arguments (tool_call_tag)
    error: str | None = None  # the call could not be read: shown to the model as the output


def stop_strings(fmt: str) -> list[str]:
    return STOPS[fmt]


def find_call(text: str, fmt: str) -> ToolCall | None:
    """The first complete tool call in `text`, or None."""
    if fmt == "python_block":
        m = _BLOCK.search(text)
        return ToolCall("python", m.group(1)) if m else None
    m = _TAG.search(text)
    if not m:
        return None
    try:
        body = json.loads(m.group(1))
        name = body["name"]
    except (ValueError, KeyError, TypeError) as e:
        hint = '<tool_call>{"name": ..., "arguments": {...}}</tool_call>'
        return ToolCall("", None, f"unreadable tool call ({e}); write {hint}")
    return ToolCall(str(name), body.get("arguments", {}))
