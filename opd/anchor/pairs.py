"""The (prompt, response) pairs a discriminator is fitted on, read from JSONL files."""

from __future__ import annotations

import json


def read_pairs(
    path: str,
    prompt_field: str,
    response_field: str | None,
    system_prompt: str | None = None,
    limit: int | None = None,
) -> list[tuple[list[dict], str | None]]:
    """(prompt messages, response) per row of `path` (a JSONL file or `registry:NAME`). A row's
    prompt is its `messages` list when it has one, else its `prompt_field` text as the user
    turn (after `system_prompt`, if given); `response_field` None reads prompts only.
    Errors name the file and the line."""
    from opd.data.sources import resolve_data

    file = resolve_data(path)
    pairs: list[tuple[list[dict], str | None]] = []
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from e
            if isinstance(row.get("messages"), list):
                messages = row["messages"]
            elif isinstance(row.get(prompt_field), str):
                messages = [{"role": "user", "content": row[prompt_field]}]
            else:
                raise ValueError(f"{where}: no {prompt_field!r} text and no 'messages' list")
            if system_prompt and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            response = None
            if response_field is not None:
                response = row.get(response_field)
                if not isinstance(response, str):
                    raise ValueError(f"{where}: no {response_field!r} text")
            pairs.append((messages, response))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"{path}: no rows")
    return pairs
