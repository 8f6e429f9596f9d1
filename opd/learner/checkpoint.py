"""Run-directory checkpoints: atomic, verified at resume, pruned to `keep_last`.

Layout: `checkpoints/step_<N>/` holds the learners' DeepSpeed state (`learner/`: model,
optimizer, scheduler), the teacher's (`teacher/`: an EMA teacher's weights),
`trainer_state.json` (step, data cursor, RNG states, config) and `manifest.json` (every
file's size and sha256). A checkpoint is written under `.tmp_step_<N>`, fsynced and renamed
when complete; `checkpoints/latest` names the newest one (for people and scripts: a resume
looks at every `step_<N>` folder).

A resume takes the newest checkpoint whose files match its manifest. A damaged one (a file
missing, truncated or changed) is skipped with a warning naming the file; when checkpoints
exist but none is intact, the resume is an error naming the damaged files, since starting
from step 0 would silently discard the run. A save that runs out of space removes its
temporary folder and says so (ENOSPC, with the path).

DeepSpeed loads its files with `torch.load(weights_only=False)`, which runs whatever code a
pickle names; `use_weights_only_loads` makes a learner load only tensors, plain containers and
the few DeepSpeed classes its state holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from opd.rundir import RunError, warn

LATEST = "latest"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
LOW_SPACE = 64 << 20  # bytes free under which a failed write is taken for a full disk


class CheckpointError(RunError):
    pass


class UnsafeCheckpointError(CheckpointError):
    pass


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

    def steps(self) -> list[int]:
        """Steps of the `step_<N>` folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = (re.fullmatch(r"step_(\d+)", p.name) for p in self.root.iterdir())
        return sorted(int(m[1]) for m in found if m)

    # -- writing ---------------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """A fresh temporary folder for step `step`'s files."""
        tmp = self.root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: dict) -> Path:
        (tmp / STATE).write_text(json.dumps(state))
        files = _hash_files(tmp, sync=True)
        _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        _fsync_dir(tmp)
        final = self.step_dir(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = self.root / f".{LATEST}.tmp"
        _write_synced(pointer, final.name)
        os.replace(pointer, self.root / LATEST)
        _fsync_dir(self.root)
        self._prune()
        return final

    def save(self, step: int, write: Callable[[Path], None], state: dict) -> Path:
        """`write(tmp)` puts the roles' files into a temporary folder, which is committed with
        `state`. On failure the temporary folder is removed; a full disk is named as such."""
        self._check_space(step)
        tmp = self.begin(step)
        try:
            write(tmp)
            return self.commit(tmp, step, state)
        except Exception as e:
            free = _free_bytes(self.root)
            shutil.rmtree(tmp, ignore_errors=True)
            if _out_of_space(e) or free < LOW_SPACE:
                raise CheckpointError(
                    f"checkpoint of step {step} failed writing {tmp}: no space left on device "
                    f"(ENOSPC): {_size(free)} free on that filesystem. The partial folder was "
                    f"removed and earlier checkpoints kept; free space (or lower "
                    f"checkpoint.keep_last) and re-run to resume"
                ) from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _check_space(self, step: int) -> None:
        """Refuse to start a checkpoint that cannot fit: one is about as big as the last."""
        for prev in reversed(self.steps()):
            try:
                files = json.loads((self.step_dir(prev) / MANIFEST).read_text())["files"]
            except (OSError, ValueError, KeyError):
                continue
            need = sum(f["size"] for f in files.values())
            free = _free_bytes(self.root)
            if free < need:
                raise CheckpointError(
                    f"no space left on device (ENOSPC) for the checkpoint of step {step} in "
                    f"{self.root}: step_{prev} took {_size(need)}, {_size(free)} are free. "
                    f"Free space (or lower checkpoint.keep_last) and re-run to resume from "
                    f"step_{prev}"
                )
            return

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def clear_partial(self) -> None:
        """Remove what an interrupted save left (the run lock says no one else is writing)."""
        if self.root.is_dir():
            for path in self.root.glob(".tmp_step_*"):
                shutil.rmtree(path, ignore_errors=True)
            (self.root / f".{LATEST}.tmp").unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every checkpoint (a run started over with run.resume=false)."""
        steps = self.steps()
        if steps:
            warn(f"run.resume=false: removing the previous checkpoints in {self.root}: {steps}")
        for step in steps:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
        (self.root / LATEST).unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------

    def latest(self) -> tuple[Path, dict] | None:
        """(folder, trainer state) of the newest intact checkpoint; None when there is none."""
        damaged = []
        for step in reversed(self.steps()):
            path = self.step_dir(step)
            try:
                state = verify(path)
            except CheckpointError as e:
                warn(f"checkpoint {path} is damaged: {e}")
                damaged.append(str(e))
                continue
            if damaged:
                warn(f"resuming from {path}, the newest intact checkpoint")
            return path, state
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.root} to resume from: "
                + "; ".join(damaged)
                + ". Restore the files, or start over: move the folder away or set "
                "run.resume=false (which removes these checkpoints)"
            )
        pointer = self.root / LATEST
        if pointer.is_file():
            raise CheckpointError(
                f"{pointer} names {pointer.read_text().strip()!r}, but {self.root} holds no "
                "checkpoint folder. Restore it, or start over: remove the pointer or set "
                "run.resume=false"
            )
        return None


def verify(path: Path) -> dict:
    """The trainer state of checkpoint `path`, after checking every file against its
    manifest; a CheckpointError names the first damaged file."""
    manifest_file, state_file = path / MANIFEST, path / STATE
    if not manifest_file.is_file():
        if not state_file.is_file():
            raise CheckpointError(f"{manifest_file}: missing")
        warn(f"{path} has no {MANIFEST} (written by an older opd): its files are not verified")
        return _read_state(state_file)
    try:
        files = json.loads(manifest_file.read_text())["files"]
        expected = {rel: (int(f["size"]), str(f["sha256"])) for rel, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_file}: unreadable ({e})") from None
    for rel, (size, _) in sorted(expected.items()):
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, its manifest says {size} (truncated?)")
    digests = _digests([path / rel for rel in sorted(expected)])
    for rel, digest in zip(sorted(expected), digests, strict=True):
        if digest != expected[rel][1]:
            raise CheckpointError(
                f"{path / rel}: its sha256 differs from the manifest's (changed after writing)"
            )
    return _read_state(state_file)


def _read_state(state_file: Path) -> dict:
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file}: unreadable ({e})") from None


# -- files ------------------------------------------------------------------------------------


def _digest(path: Path, sync: bool = False) -> str:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def _digests(paths: list[Path], sync: bool = False) -> list[str]:
    """sha256 of each file, several at a time (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return list(pool.map(lambda p: _digest(p, sync), paths))


def _hash_files(folder: Path, sync: bool) -> dict[str, dict]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = _digests(paths, sync)
    if sync:
        for sub in {p.parent for p in paths}:
            _fsync_dir(sub)
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(paths, digests, strict=True)
    }


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _out_of_space(e: BaseException | None) -> bool:
    """Whether `e` or an exception it came from is a full disk (some writers, torch's among
    them, lose the errno: `basic_ios::clear: iostream error`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# -- loading DeepSpeed state without running pickled code -------------------------------------


def _deepspeed_state_classes() -> list:
    """The non-tensor classes in DeepSpeed 0.19's checkpoints (ZeRO 0-3, fp32 / bf16 / fp16),
    found with `torch.serialization.get_unsafe_globals_in_checkpoint`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """`torch.load(path, weights_only=True)`, allowing DeepSpeed's state classes; a file that
    needs anything else is refused, naming the file."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(
            r"WeightsUnpickler error: (.*?)(?: was not an allowed|\. Please|$)", str(e), re.M
        )
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds more than weights and plain state "
            f"({found[1] if found else 'not a weights-only pickle'}); opd loads checkpoints "
            "with torch.load(weights_only=True) and this file was not written by its learner"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: could not be loaded ({type(e).__name__}: {e})") from e


def use_weights_only_loads(engine) -> None:
    """Route every load of a DeepSpeed engine's checkpoint engine (model states, optimizer
    states) through `load_weights_only`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = engine.checkpoint_engine
    if type(ce) is not TorchCheckpointEngine:
        raise CheckpointError(
            f"DeepSpeed chose the {type(ce).__name__} checkpoint engine; opd loads only "
            "through TorchCheckpointEngine, made weights-only"
        )
    ce.load = load_weights_only  # an instance attribute: this engine only
