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
