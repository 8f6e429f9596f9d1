"""metrics.jsonl: one JSON object per step; a resumed run first drops lines past its step.

Each line is flushed and fsynced when written. Re-writing the file on resume goes through a
temporary file and a rename, so a kill at any moment leaves the old file or the new one. A
torn last line (the process died while appending it) is dropped with a warning; a bad line
anywhere else is an error naming the file and the line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from opd.rundir import RunError, warn


class MetricsError(RunError):
    pass


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None) -> None:
        self.path = Path(path)
        if resume_step is None:
            _replace(self.path, "")
        elif self.path.exists():
            kept = [line for line, row in _read(self.path) if row["step"] <= resume_step]
            _replace(self.path, "".join(line + "\n" for line in kept))

    trackers = None  # `opd.tracking.Trackers`, given each row after the file (`logging:`)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step}
        for k, v in sorted(metrics.items()):
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [row for _, row in _read(Path(path))]


def _read(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for every line of `path`."""
    text = path.read_text()
    lines = text.split("\n")
    # A file written only by `MetricsLog` ends with a newline; anything after the last one is
    # a line whose writer died mid-way.
    torn = lines.pop() if lines else ""
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _row(line)
        if row is None:
            if number == len(lines) and not torn.strip():
                torn = line  # the last line, unparsable: torn too (e.g. a crash after a flush)
                break
            raise MetricsError(
                f"{path}, line {number}: not a metrics row ({line[:80]!r}); fix or delete "
                "that line to resume"
            )
        rows.append((line, row))
    if torn.strip():
        warn(f"{path}: dropped a torn last line ({torn[:80]!r}): its writer was interrupted")
    return rows


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` through `<path>.tmp`, fsync and rename (the run lock makes the
    temporary name this process's own)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
