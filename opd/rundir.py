"""What keeps a run directory safe: one `opd train` at a time, and no leftovers.

- `RunLock`: an flock on `<output_dir>/.opd-train.lock`, held for the whole run. A second
  `opd train` on the same directory fails at once, naming the holder (pid, host); the kernel
  drops the lock when its process dies, however it dies, so a stale lock never blocks.
- Owned names: temporary folders and files outside the run directory (the weight-sync folder
  in `/dev/shm`, builds in the cache) carry their owner's pid and host, so that a later start
  can remove those whose owner died without cleaning up (kill -9, power loss).
- `RunError`: a failure whose message says everything a user needs; `opd train` prints it
  without a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".opd-train.lock"


class RunError(RuntimeError):
    """A run cannot start or go on; the message names the cause and the path."""


class RunDirLocked(RunError):
    pass


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _host() -> str:
    return socket.gethostname()


class RunLock:
    """An exclusive, non-blocking flock on `<run_dir>/.opd-train.lock`; the file names its
    holder. The file stays when the run ends: only the flock says whether a run holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(
                f"{self.path.parent} is in use by another opd train ({self.holder()}); "
                "wait for it to end or stop it, or give this run another run.output_dir"
            ) from None
        holder = {"pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder not recorded in {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- owned names ------------------------------------------------------------------------------


def owned_prefix(prefix: str) -> str:
    """`<prefix><pid>@<host>@`, for `tempfile`'s `prefix=`: the name tells who owns it."""
    return f"{prefix}{os.getpid()}@{_host()}@"


def owned_name(prefix: str, suffix: str = "") -> str:
    """`<prefix><pid>@<host>@<random><suffix>`."""
    return f"{owned_prefix(prefix)}{secrets.token_hex(4)}{suffix}"


def _owner(name: str, prefix: str, suffix: str) -> tuple[int, str] | None:
    pattern = re.escape(prefix) + r"(\d+)@([^@/]+)@[^@/]+" + re.escape(suffix)
    m = re.fullmatch(pattern, name)
    return (int(m[1]), m[2]) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale(name: str, prefix: str, suffix: str = "") -> bool:
    """An owned name whose owner ran on this host and is gone (another host's, or one not
    made by `owned_name`, is never judged stale)."""
    owner = _owner(name, prefix, suffix)
    return owner is not None and owner[1] == _host() and not pid_alive(owner[0])


def clear_stale(parent: str | Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the files and folders under `parent` named by dead owners; returns them."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for path in parent.glob(f"{glob_escape(prefix)}*"):
        if not is_stale(path.name, prefix, suffix):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, a SIGTERM that would kill the process outright (the default action)
    raises SystemExit(143) instead, so that `finally` and `except` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
