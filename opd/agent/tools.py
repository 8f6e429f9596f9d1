"""Tools a trajectory can call. Whatever a tool does (fails, hangs, prints megabytes), the
model gets text back and the run goes on: errors and timeouts become the tool's output.

- `python`: the code runs in the sandbox (`opd.rewards.sandbox.run_python`: no network, its
  own scratch directory, time and memory limits); the output is its stdout, then its stderr.
- a user's tool, "pkg.mod:fn": `fn(arguments) -> str`, called on a thread with the timeout
  (a tool that overruns is reported as timed out and its late answer dropped).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Callable
from dataclasses import dataclass

from opd.imports import import_attr


@dataclass
class ToolResult:
    # ok | error | timeout | output_limit | killed (the python tool's sandbox statuses) |
    # unknown_tool | bad_call
    status: str
    output: str  # what the model is shown (already cut to the limit)
    seconds: float = 0.0


def clip_output(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its head and tail (a traceback's last
    line is where its error is) around a note of how much was cut."""
    if len(text) <= limit:
        return text
    head = limit - limit // 2
    tail = text[len(text) - limit // 2 :] if limit // 2 else ""
    return f"{text[:head]}\n[output cut: {len(text) - limit} characters]\n{tail}"


def python_tool(code: str, *, timeout_s: float, memory_mb: int, limit: int) -> ToolResult:
    from opd.rewards.sandbox import run_python

    # the sandbox keeps a little over `limit`: enough to show what fits and say it was cut
    r = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=limit + 256)
    text = "\n".join(part for part in (r.stdout.strip(), r.stderr.strip()) if part)
    text = clip_output(text or "[no output]", limit)
    note = {
        "timeout": f"[timed out after {timeout_s:g} s]",
        "output_limit": "[stopped: too much output]",
        "killed": "[killed]",
    }.get(r.status)
    return ToolResult(r.status, text + f"\n{note}" if note else text, r.seconds)


TOOLS: dict[str, str] = {"python": "runs python code in the sandbox; its output comes back"}


class ToolBox:
    """The recipe's tools, callable by name; `call` never raises for what a tool does."""

    def __init__(self, names: list[str], timeout_s: float, memory_mb: int, limit: int) -> None:
        self.timeout_s, self.memory_mb, self.limit = timeout_s, memory_mb, limit
        self.user: dict[str, Callable] = {}
        for name in names:
            if ":" in name:
                fn = import_attr(name, "agent.tools", "pkg.mod:fn")
                self.user[name.rpartition(":")[2]] = fn
        self.names = [n for n in names if ":" not in n] + list(self.user)
        self._pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="opd-user-tool")

    def call(self, name: str, arguments) -> ToolResult:
        if name == "python" and "python" in self.names:
            code = arguments if isinstance(arguments, str) else (arguments or {}).get("code")
            if not isinstance(code, str):
                return ToolResult("bad_call", 'python takes {"code": "..."}')
            return python_tool(
                code, timeout_s=self.timeout_s, memory_mb=self.memory_mb, limit=self.limit
            )
        fn = self.user.get(name)
        if fn is None:
            return ToolResult("unknown_tool", f"no tool {name!r}; tools: {', '.join(self.names)}")
        future = self._pool.submit(fn, arguments)
        try:
            out = future.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            return ToolResult("timeout", f"[{name} timed out after {self.timeout_s:g} s]")
        except Exception as e:  # the tool's own failure is the model's to see
            return ToolResult("error", clip_output(f"{type(e).__name__}: {e}", self.limit))
        text = out if isinstance(out, str) else json.dumps(out, default=str)
        return ToolResult("ok", clip_output(text, self.limit))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
