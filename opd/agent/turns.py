"""A tool turn's tokens under the model's own chat template.

The model's turns stay the tokens it sampled. After a turn that called a tool, the loop
inserts what the template puts between that assistant turn and the next one: the end of the
assistant turn, the tool turn holding the output, and the header of the next assistant turn.
That text is read off the template itself, by rendering a conversation with marker strings
in place of the assistant's words and the tool's output."""

from __future__ import annotations

_SAID, _OUT = "OPDSAIDMARK", "OPDTOOLOUTPUTMARK"


class ToolTurns:
    def __init__(self, tokenizer, role: str) -> None:
        self.tokenizer = tokenizer
        user = {"role": "user", "content": "q"}
        said = {"role": "assistant", "content": _SAID}
        try:
            text = tokenizer.apply_chat_template(
                [user, said, {"role": role, "content": _OUT}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:
            raise ValueError(
                f"agent.tool_role={role!r}: the student's chat template cannot render a "
                f"{role!r} turn after an assistant turn ({e}); set agent.tool_role (e.g. user)"
            ) from e
        if text.count(_SAID) != 1 or text.count(_OUT) != 1:
            raise ValueError(
                f"agent.tool_role={role!r}: the chat template does not show a {role!r} turn's "
                "content as it is; set agent.tool_role (e.g. user)"
            )
        said_end = text.index(_SAID) + len(_SAID)
        out_at = text.index(_OUT)
        self.before, self.after = text[said_end:out_at], text[out_at + len(_OUT) :]

    def ids(self, output: str) -> list[int]:
        """The tokens inserted after a turn whose tool printed `output`. The output is
        tokenized as plain text: a tool that prints a special token's string (an end of turn,
        a role header) cannot open a turn of its own."""

        def tokens(text: str, plain: bool = False) -> list[int]:
            kwargs = {"split_special_tokens": True} if plain else {}
            return self.tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]

        return tokens(self.before) + tokens(output, plain=True) + tokens(self.after)

    def demonstration(self, turns: object, where: str) -> tuple[list[int], list[int], list[int]]:
        """A written tool-using conversation (`data.completion_field` holding a list of
        {"role": "assistant" | "tool", "content": ...} turns, assistant first and last) as the
        rollout lays one out: (token ids, loss mask, step ids). The assistant turns are the
        model's words (mask 1, one step each); each tool turn is inserted as `ids` inserts a
        tool's output (mask 0); the end of the last turn is the end-of-sequence token.
        `where` names the row in errors."""
        roles = [t.get("role") if isinstance(t, dict) else None for t in turns or []]
        ok = (
            isinstance(turns, list)
            and len(roles) % 2 == 1
            and all(r == ("assistant" if i % 2 == 0 else "tool") for i, r in enumerate(roles))
            and all(isinstance(t.get("content"), str) for t in turns)
        )
        if not ok:
            raise ValueError(
                f"{where}: a conversation must alternate assistant and tool turns "
                f'({{"role": ..., "content": "..."}}), starting and ending with assistant; '
                f"got roles {roles}"
            )
        ids, mask, steps = [], [], []
        for i, t in enumerate(turns):
            if t["role"] == "assistant":
                said = self.tokenizer(t["content"], add_special_tokens=False)["input_ids"]
                if i == len(turns) - 1:
                    said = [*said, self.tokenizer.eos_token_id]
                ids, mask, steps = ids + said, mask + [1] * len(said), steps + [i // 2] * len(said)
            else:
                out = self.ids(t["content"])
                ids, mask, steps = ids + out, mask + [0] * len(out), steps + [i // 2] * len(out)
        return ids, mask, steps
