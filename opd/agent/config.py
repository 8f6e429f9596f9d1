"""The `agent:` block: rollouts that call tools. Off unless `tools` names at least one."""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.imports import split_import_path

FORMATS = ("python_block", "tool_call_tag")


@dataclass
class AgentConfig:
    # registered tools (`python`) or users' tools as "pkg.mod:fn"; empty: single-turn rollouts
    tools: list[str] = field(default_factory=list)
    # how the model calls a tool: `python_block`, a fenced ```python block (the python tool
    # runs it); `tool_call_tag`, <tool_call>{"name": ..., "arguments": ...}</tool_call>
    format: str = "python_block"
    max_turns: int = 4  # assistant turns per trajectory; the last one gets no tool output
    tool_timeout_s: float = 5.0  # per tool call; a timeout is output the model sees
    tool_memory_mb: int = 256  # the python tool's address-space limit
    max_tool_output_chars: int = 2000  # longer output is cut, with a note the model sees
    tool_role: str = "tool"  # the chat role of a tool's output (`user` for templates without)
    tool_workers: int = 8  # tool calls of one turn running at once
    # a regex every trajectory's first turn must match (vLLM structured outputs): e.g. to make
    # a small model open with a tool call; None: free
    first_turn_regex: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tools)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"agent.format={self.format!r}; valid: {', '.join(FORMATS)}")
        for key in ("max_turns", "tool_memory_mb", "max_tool_output_chars", "tool_workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"agent.{key}={getattr(self, key)} must be >= 1")
        if not self.tool_timeout_s > 0:
            raise ValueError(f"agent.tool_timeout_s={self.tool_timeout_s} must be > 0")
        from opd.agent.tools import TOOLS

        for name in self.tools:
            if ":" in name:
                split_import_path(name, "agent.tools", "pkg.mod:fn")
            elif name not in TOOLS:
                raise ValueError(
                    f"agent.tools: unknown tool {name!r}; registered: {', '.join(TOOLS)}, "
                    "or a function of yours as 'pkg.mod:fn'"
                )
        if self.enabled and self.format == "python_block" and list(self.tools) != ["python"]:
            raise ValueError(
                f"agent.format=python_block runs fenced python blocks: agent.tools must be "
                f"[python], got {self.tools}; name other tools with format tool_call_tag"
            )
