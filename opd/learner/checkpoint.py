"""Run-directory checkpoints: atomic, complete, pruned to `keep_last`.

Layout: `checkpoints/step_<N>/` holds the learners' DeepSpeed state (`learner/`: model,
optimizer, scheduler) and `trainer_state.json` (step, data cursor, RNG states, config).
A checkpoint is written under `.tmp_step_<N>` and renamed when complete; `checkpoints/latest`
names the newest complete one and is itself replaced atomically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

LATEST = "latest"
STATE = "trainer_state.json"


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class CheckpointDir:
    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root, self.keep_last = Path(root), keep_last

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def begin(self, step: int) -> Path:
        """A fresh temporary folder for step `step`'s files."""
        tmp = self.root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: dict) -> Path:
        (tmp / STATE).write_text(json.dumps(state))
        final = self.step_dir(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = self.root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.root / LATEST)
        self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted(int(p.name.split("_")[1]) for p in self.root.glob("step_*"))
        for step in steps[: -self.keep_last]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def latest(self) -> tuple[Path, dict] | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        state_file = path / STATE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{pointer} names {path}, which has no {STATE}: the "
                "checkpoint is incomplete; remove the pointer to start over"
            )
        return path, json.loads(state_file.read_text())
