"""One reward function behind a deadline: in a child process that can be killed, or in a thread.

Both callers answer `call(record, completion, timeout_s)` with `(status, value)`: `("ok",
reward)`, `("error", message)` or `("timeout", message)`. They never raise for what the
reward function does.

`ProcessCaller` keeps a spawned Python process holding the function and sends it one
(record, completion) at a time over a pipe. When no answer has come after `timeout_s`, it kills
the process (SIGKILL), which stops whatever the function was doing, a long C call that holds
the GIL included, and the next call starts a fresh process. Starting the process and
importing the function's module are not counted in `timeout_s` (they have their own, longer,
`start_timeout_s`). Spawn rather than fork: the caller is often a Ray actor with threads
(vLLM, torch), which a forked child would inherit in an unknown state. The function travels
by pickle, i.e. by reference (its module and name): it must be a module-level function of a
module the child can import (the child gets the parent's `sys.path`). A process killed while
its function ran a subprocess leaves that subprocess to its own limits (the code sandbox
bounds and cleans up its own runs).

`ThreadCaller` runs the function in a daemon thread (`opd.rewards.math.run_with_deadline`):
no process to start, but on a timeout it can only stop Python code at its next bytecode. A
blocking call that releases the GIL (`time.sleep`, I/O) is abandoned and finishes in the
background; one that holds the GIL (a huge integer power) stalls the whole caller until it
ends.
"""

from __future__ import annotations

import multiprocessing
import pickle
from typing import Any

from opd.rewards.math import run_with_deadline

START_TIMEOUT_S = 120.0  # spawning the child and importing the reward's module

_SPAWN = multiprocessing.get_context("spawn")


def _describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class ThreadCaller:
    """The reward function in a daemon thread per call (see the module docstring)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def call(self, record: Any, completion: str, timeout_s: float) -> tuple[str, Any]:
        try:
            done, value = run_with_deadline(self.fn, (record, completion), timeout_s)
        except Exception as err:
            return "error", _describe_error(err)
        if not done:
            return "timeout", f"no answer after {timeout_s:g}s"
        return "ok", value

    def stop(self) -> None:
        """Nothing to stop: a timed-out thread was already asked to stop."""


class ProcessCaller:
    """The reward function in a child process, killed and restarted after a timeout."""

    def __init__(self, fn: Any, start_timeout_s: float = START_TIMEOUT_S) -> None:
        try:
            self.payload = pickle.dumps(fn)
        except Exception as err:
            raise ValueError(
                f"reward {fn!r} cannot be sent to a child process ({err}); make it a "
                "module-level function, or use rewards.isolation=thread"
            ) from err
        self.start_timeout_s = start_timeout_s
        self._proc: Any = None
        self._conn: Any = None

    def call(self, record: Any, completion: str, timeout_s: float) -> tuple[str, Any]:
        failed = self._start()
        if failed:
            return "error", failed
        try:
            self._conn.send((record, completion))
        except Exception as err:  # a record that does not pickle, a closed pipe
            self.stop()  # start clean next time
            return "error", f"cannot send the record to the reward process: {err}"
        if not self._conn.poll(timeout_s):
            self.stop()
            return "timeout", f"no answer after {timeout_s:g}s"
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self.stop()
            return "error", f"the reward process died (exit code {code})"

    def _start(self) -> str | None:
        """Start the child if none is running; an error message if it could not start."""
        if self._proc is not None and self._proc.is_alive():
            return None
        self.stop()
        parent, child = _SPAWN.Pipe()
        self._proc = _SPAWN.Process(
            target=serve, args=(child, self.payload), name="opd-reward", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.start_timeout_s):
            self.stop()
            return f"the reward process did not start within {self.start_timeout_s:g}s"
        try:
            status, message = parent.recv()
        except (EOFError, OSError):
            status, message = "failed", f"exit code {self._proc.exitcode}"
        if status != "ready":
            self.stop()
            return f"the reward process could not load the reward: {message}"
        return None

    def stop(self) -> None:
        """Kill the child (if any) and close the pipe."""
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def serve(conn: Any, payload: bytes) -> None:
    """The child's loop: load the function, then answer one (record, completion) at a time
    until the parent closes the pipe."""
    try:
        fn = pickle.loads(payload)
    except Exception as err:
        conn.send(("failed", _describe_error(err)))
        return
    conn.send(("ready", None))
    while True:
        try:
            record, completion = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", float(fn(record, completion)))
        except Exception as err:
            reply = ("error", _describe_error(err))
        conn.send(reply)
