"""metrics.jsonl: one JSON object per step; a resumed run first drops lines past its step."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step}
        for k, v in sorted(metrics.items()):
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
