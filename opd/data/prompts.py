"""Prompt datasets: load rows, render chat messages, tokenize, drop over-long, shuffle, resume.

Rows come from jsonl, parquet, or a `datasets` folder saved with `save_to_disk`. The recipe maps
the prompt field (`data.prompt_field`); the student's chat template renders the messages.
Order is a permutation seeded by (run.seed, epoch), and the cursor (epoch, position) is part
of every checkpoint, so a resumed run sees exactly the prompts the uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Prompt:
    id: str
    messages: list[dict[str, str]]
    token_ids: list[int]  # rendered by the student's chat template, generation prompt added
    row: dict[str, Any]  # the source row, for fields objectives may need (demonstrations, ...)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl / parquet file or a `datasets` folder; errors name the file and row."""
    return [row for _, row in read_located_rows(path)]


def read_located_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """`(where, row)` pairs: `where` is `file:line` for jsonl, `file: row i` (from 0) else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir() or path.suffix == ".parquet":
        return [(f"{path}: row {i}", row) for i, row in enumerate(_table_rows(path))]
    rows = []
    for line_no, line in jsonl_lines(path):
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object per line")
        rows.append((where, row))
    return rows


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file's non-blank lines; a line that is not UTF-8 is an
    error naming the file, the line and the byte."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:  # a BOM may open the file
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at "
                    f"column {e.start + 1} of the line)"
                ) from None
            if text.strip():
                yield line_no, text


def _table_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet file or a folder saved by `datasets`; unreadable ones name the path."""
    try:
        if path.is_dir():
            import datasets  # optional dependency, only for folders saved by `datasets`

            return [dict(r) for r in datasets.load_from_disk(str(path))]
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as e:
        what = "a folder saved by datasets.save_to_disk" if path.is_dir() else "parquet"
        raise ValueError(f"{path}: not readable as {what} ({type(e).__name__}: {e})") from e


def text_field(row: dict[str, Any], field: str, where: str, key: str) -> str:
    """`row[field]` when it is non-empty text; else an error naming the row, field and key."""
    if field not in row:
        raise ValueError(
            f"{where}: no field {field!r} ({key}); the row has: {', '.join(sorted(row))}"
        )
    value = row[field]
    if not isinstance(value, str):
        shown = json.dumps(value, default=str)[:60]
        shown = "null" if value is None else f"a {type(value).__name__} ({shown})"
        raise ValueError(f"{where}: field {field!r} ({key}) is {shown}, not text")
    if not value.strip():
        raise ValueError(f"{where}: field {field!r} ({key}) is empty")
    return value


def render_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def recipe_prompts(
    data, rows: list[dict[str, Any]], tokenizer, source: str
) -> tuple[list[Prompt], int]:
    """`build_prompts` with the recipe's `data` section (a `DataConfig`) giving the fields."""
    return build_prompts(
        rows,
        tokenizer,
        prompt_field=data.prompt_field,
        id_field=data.id_field,
        system_prompt=data.system_prompt,
        max_prompt_tokens=data.max_prompt_tokens,
        source=source,
    )


def build_prompts(
    rows: list[dict[str, Any]],
    tokenizer,
    *,
    prompt_field: str,
    id_field: str | None,
    system_prompt: str | None,
    max_prompt_tokens: int,
    source: str,
) -> tuple[list[Prompt], int]:
    """Prompts that fit, and how many rows were dropped for being longer than the limit."""
    prompts, dropped = [], 0
    for i, row in enumerate(rows):
        if prompt_field not in row:
            raise ValueError(
                f"{source}: row {i} has no field {prompt_field!r} (data.prompt_field); "
                f"its fields: {', '.join(sorted(row))}"
            )
        text = text_field(row, prompt_field, f"{source}: row {i}", "data.prompt_field")
        messages = [{"role": "user", "content": text}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        ids = render_ids(tokenizer, messages)
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        pid = str(row[id_field]) if id_field and id_field in row else f"{Path(source).stem}/{i}"
        prompts.append(Prompt(id=pid, messages=messages, token_ids=ids, row=row))
    return prompts, dropped


class PromptStream:
    """An endless, seeded, resumable stream over a list of prompts, epoch after epoch."""

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("no training prompts left (all dropped or none given)")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != len(self.prompts):
            raise ValueError(
                f"checkpoint data cursor was for {state['size']} prompts, the data now has "
                f"{len(self.prompts)}: the training data changed since the checkpoint"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
