"""Run untrusted Python (model-written code) with hard limits; used by code rewards.

``run_python(code)`` runs ``python -I main.py`` through a bootstrap (:mod:`.sandbox_child`, run
as ``python -I -S sandbox_child.py``; how it sets each mode up is described there) and returns a
:class:`SandboxResult`. This side (the parent) picks the mode and the run's uid, only reads
capped pipes, enforces a wall-clock deadline and tears everything down; it never runs untrusted
code.

Modes, picked once per interpreter by probing (``sandbox_mode()``), best first:

``"bwrap"`` (root, bubblewrap installed, the kernel allows namespaces; the mode on the dev VM
and in CI):
  * namespaces, made by bubblewrap: new PID, mount, IPC, UTS, cgroup and network namespaces and
    a new session. When the program exits or the bootstrap is killed, every process left in
    them dies (daemonised or ``setsid`` children cannot escape), and so do the SysV IPC objects
    and POSIX message queues it made; the host's are not visible.
  * network: none -- no TCP/UDP anywhere, no abstract unix sockets of the host
    (``network=True`` keeps the host network, and shows /etc/resolv.conf and /etc/hosts).
  * filesystem: an empty root holding, read-only, only the interpreter's installation (its
    prefixes: stdlib and site-packages), the system library dirs (``/usr/lib*``, ``/lib*``),
    ``/etc/ld.so.cache`` and the bootstrap; a fresh ``/dev`` (null, zero, random, tty, ...) and
    ``/proc`` (sandbox processes only); the cwd ``/tmp`` (= HOME = TMPDIR), a private tmpfs of
    ``max_dir_mb`` gone with the run, and a private 1 MiB ``/dev/shm``. No other host file is
    visible (``/etc/passwd``, the project checkout, other runs' dirs), hence no path-based unix
    socket of the host either.
  * credentials: a per-run unprivileged uid/gid (``UID_BASE + slot``, slot locked with flock so
    concurrent runs never share one), no supplementary groups, no capabilities,
    ``no_new_privs``. Hence RLIMIT_NPROC is enforced per run (it is not for root), the program
    cannot signal or ptrace the caller or other runs, and owns nothing outside its tmpfs.
``"ns"`` (root and namespaces, but no working bubblewrap): the same, with the namespaces (PID,
  mount, IPC, UTS, network) made by the bootstrap itself, except the filesystem: the host's is
  visible read-only, so world-readable host files and path-based unix sockets of the host are
  reachable. Interpreter dirs under a non-world-traversable parent (pyenv in ``/root``) are
  visible, the rest of that parent is not.
``"uid"`` (root, no namespaces): same uid drop and rlimits, a host temp dir as cwd (removed
  afterwards); cleanup kills every process of the slot uid (``kill(-1)`` as that uid, which is
  atomic against fork). NOT isolated: the network (an audit hook refusing ``socket.*`` is
  installed -- defence in depth only, ctypes bypasses it), world-writable dirs such as /tmp and
  /dev/shm, world-readable host files and unix sockets. No IPC namespace: the syscall filter
  refuses SysV IPC and POSIX message queues instead. Needs an interpreter readable by other
  users (pass ``python=``).
``"plain"`` (not root): rlimits + process-group kill + the audit hook + the syscall filter (IPC
  refused as in ``"uid"``). RLIMIT_NPROC then counts all processes of the calling user. Root
  never falls back to this mode.
Falling back logs one warning saying what the mode leaves open. ``SandboxResult.mode`` says
which mode ran; ``network_isolated`` and ``syscall_filter`` what the run got.

Every mode: a new, empty session keyring (the caller's keys are not reachable); a seccomp filter
(:mod:`.sandbox_seccomp`, compiled by libseccomp, which apt itself depends on; without it one
warning and no filter) refusing namespace creation (so no nested user namespace), mount,
setns, every key syscall, ptrace and process_vm_*, bpf, perf_event_open, io_uring, kernel
modules and the like; RLIMIT_CPU/AS/NPROC/FSIZE/NOFILE, no core dumps, a minimal environment
(no inherited secrets), stdin ``/dev/null``, stdout/stderr read incrementally and capped (the
run is killed past the cap), a parent-death signal on every level. Not enforced: aggregate
memory (up to ``max_processes * memory_mb`` plus the tmpfs; no cgroup is used), CPU share, and
kernel bugs reachable through the syscalls the filter allows.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from opd.rewards import sandbox_child, sandbox_seccomp

UID_BASE, UID_SLOTS = 1_600_000_000, 4096
_CHILD = sandbox_child.__file__  # the bootstrap, run as a plain script
_BOOT_IN_BWRAP = "/opd-sandbox/sandbox_child.py"  # where bubblewrap shows it
_LIB_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64")
_NET_FILES = ("/etc/resolv.conf", "/etc/hosts")  # shown with network=True only
_log = logging.getLogger(__name__)
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_PROBE_LIMITS = {
    "cpu_s": 30,
    "memory_mb": 512,
    "max_processes": 32,
    "max_file_mb": 16,
    "max_open_files": 64,
    "dir_mb": 16,
}


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (never raised for what the program does)."""


@dataclass
class SandboxResult:
    status: str  # "ok" | "error" (exit != 0) | "killed" (signal) | "timeout" | "output_limit"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network_isolated: bool
    mode: str = ""  # "bwrap" | "ns" | "uid" | "plain": what isolated this run
    syscall_filter: bool = False  # the seccomp filter was installed

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: int | None = None,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    max_output_bytes: int = 64_000,
    max_dir_mb: int = 64,
    network: bool = False,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``python -I main.py`` in the sandbox; never raises for what it does."""
    python = python or default_python()
    limits = {
        "cpu_s": int(cpu_s or math.ceil(timeout_s) + 1),
        "memory_mb": memory_mb,
        "max_processes": max_processes,
        "max_file_mb": max_file_mb,
        "max_open_files": max_open_files,
        "dir_mb": max_dir_mb,
    }
    return _run(code, sandbox_mode(python), python, timeout_s, max_output_bytes, network, limits)


def default_python() -> str:
    """The base interpreter, not a venv's: the program needs only the standard library, and a
    venv may live under /tmp, which the sandbox replaces with its own private tmpfs."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def sandbox_mode(python: str | None = None) -> str:
    """The best mode that works for ``python`` here ("bwrap", "ns", "uid" or "plain");
    probed once."""
    return _probe(python or default_python())


_GAPS = {
    "ns": "host files are readable (read-only) and host unix sockets reachable",
    "uid": "network NOT isolated (audit hook only), no IPC namespace, /tmp and host files shared",
}


@functools.cache
def _probe(python: str) -> str:
    errors = []
    modes = ("bwrap", "ns", "uid") if os.geteuid() == 0 else ("plain",)
    if _bwrap() is None:
        errors.append("bwrap: not installed (Debian: bubblewrap)")
        modes = modes[1:] if modes[0] == "bwrap" else modes
    for mode in modes:
        try:
            res = _run("print('opd-ok')", mode, python, 30.0, 4096, False, _PROBE_LIMITS)
        except SandboxError as e:
            errors.append(f"{mode}: {e}")
            continue
        if res.ok and res.stdout.strip() == "opd-ok":
            if mode in _GAPS:
                _log.warning("sandbox: %s; using mode %r: %s", errors, mode, _GAPS[mode])
            return mode
        errors.append(f"{mode}: {res.status} {res.stderr.strip()[-300:]}")
    raise SandboxError("no working sandbox mode: " + " | ".join(errors))


def _run(
    code: str, mode: str, python: str, timeout_s: float, cap: int, network: bool, limits: dict
) -> SandboxResult:
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(_slot(reap_first=mode == "uid")) if mode != "plain" else None
        workdir = None
        if mode in ("uid", "plain"):
            workdir = tempfile.mkdtemp(prefix="opd-sandbox-")
            stack.callback(shutil.rmtree, workdir, True)
            if uid is not None:
                os.chown(workdir, uid, uid)
        ready_r, ready_w = os.pipe()
        stack.callback(os.close, ready_r)
        netns = mode in ("bwrap", "ns") and not network
        bpf = _syscall_filter(deny_ipc=mode in ("uid", "plain"))
        cfg = dict(
            limits,
            mode=mode,
            netns=netns,
            network=network,
            uid=uid,
            python=python,
            env=_ENV,
            workdir=workdir,
            ready_fd=ready_w,
            expose=_hidden_paths(python) if mode == "ns" else [],
            bwrap=_bwrap_argv(python, network) if mode == "bwrap" else None,
            boot=_BOOT_IN_BWRAP,
            seccomp=bpf,
            keyctl_nr=sandbox_seccomp.syscall_number("keyctl"),
        )
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _CHILD, "--boot", json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_ENV,
                pass_fds=(ready_w,),
                start_new_session=True,
            )
        finally:
            os.close(ready_w)
        with proc:
            try:
                status, out, err = _communicate(proc, code.encode(), start + timeout_s, cap)
                if status is None:
                    try:
                        proc.wait(timeout=max(0.0, start + timeout_s - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        status = "timeout"
            finally:
                killed = _kill(proc)
                if uid is not None and (killed or mode == "uid"):
                    _reap_uid(uid)
        seconds = time.monotonic() - start
        rc = proc.returncode
        status = status or ("ok" if rc == 0 else "error" if rc > 0 else "killed")
        stderr = err.decode(errors="replace")
        if status != "timeout" and not _was_ready(ready_r):
            raise SandboxError(f"sandbox setup failed (mode {mode}, rc {rc}): {stderr[-2000:]}")
        stdout = out.decode(errors="replace")
        return SandboxResult(status, rc, stdout, stderr, seconds, netns, mode, bpf is not None)


@functools.cache
def _syscall_filter(deny_ipc: bool) -> str | None:
    """The seccomp program as hex, or None (logged once) where libseccomp is missing."""
    try:
        return sandbox_seccomp.filter_bpf(deny_ipc).hex()
    except OSError as e:
        _log.warning("sandbox: no syscall filter (%s): unshare, keyctl, ptrace... allowed", e)
        return None


def _communicate(
    proc: subprocess.Popen, data: bytes, deadline: float, cap: int
) -> tuple[str | None, bytes, bytes]:
    """Feed stdin, read both pipes up to ``cap`` bytes each; stop early on timeout / overflow."""
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    out = lambda status: (
        status,
        bytes(bufs[proc.stdout.fileno()]),
        bytes(bufs[proc.stderr.fileno()]),
    )
    exited_at = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return out("timeout")
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # the program is over; stray children still hold the pipes
            for key, _ in sel.select(min(deadline - now, 0.1)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                over = len(buf) + len(chunk) > cap
                buf += chunk[: max(0, cap - len(buf))]
                if over:
                    return out("output_limit")
    return out(None)


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the bootstrap's process group (its init then takes the namespace down)."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    return True


def _was_ready(ready_r: int) -> bool:
    os.set_blocking(ready_r, False)
    try:
        return os.read(ready_r, 1) == b"R"
    except BlockingIOError:
        return False


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
                if str(uid) in uids:
                    pids.append(int(name))
    return pids


def _reap_uid(uid: int, wait_s: float = 5.0) -> None:
    """Kill every process of ``uid`` and wait until they are gone."""
    subprocess.run(
        [sys.executable, "-I", "-S", _CHILD, "--kill-uid", str(uid)],
        env=_ENV,
        timeout=30,
        check=False,
    )
    deadline = time.monotonic() + wait_s
    while (left := _uid_pids(uid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        _log.warning("sandbox: uid %d still has processes %s after SIGKILL", uid, left)


@contextlib.contextmanager
def _slot(reap_first: bool) -> Iterator[int]:
    """A uid nobody else is using: one flock-ed file per slot in a private dir."""
    root = os.path.join(tempfile.gettempdir(), f"opd-sandbox-slots-{os.geteuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(f"{root} must be a private directory of uid {os.geteuid()}")
    start = random.randrange(UID_SLOTS)
    for k in range(UID_SLOTS):
        slot = (start + k) % UID_SLOTS
        fd = os.open(os.path.join(root, str(slot)), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if reap_first and _uid_pids(UID_BASE + slot):
                _reap_uid(UID_BASE + slot)
            yield UID_BASE + slot
        finally:
            os.close(fd)
        return
    raise SandboxError("all sandbox uid slots are busy")


@functools.cache
def _hidden_paths(python: str) -> list[list[str]]:
    """(hidden top dir, needed path) for interpreter dirs other users cannot traverse."""
    want = {
        os.path.dirname(os.path.dirname(os.path.realpath(python))),
        sys.prefix,
        sys.base_prefix,
        *(p for p in sys.path if os.path.isabs(p) and os.path.isdir(p)),
    }
    pairs: list[list[str]] = []
    for path in sorted({os.path.realpath(p) for p in want}):
        if any(path == q or path.startswith(q + "/") for _, q in pairs):
            continue
        cur = "/"
        for part in path.strip("/").split("/")[:-1]:
            cur = os.path.join(cur, part)
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                pairs.append([cur, path])
                break
    return pairs


def _bwrap() -> str | None:
    return shutil.which("bwrap", path=_ENV["PATH"])


@functools.cache
def _bwrap_argv(python: str, network: bool) -> tuple[str, ...]:
    """bubblewrap's command line: namespaces, and a root holding only what Python needs."""
    argv = [_bwrap(), "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    argv += [] if network else ["--unshare-net"]
    argv += ["--new-session", "--die-with-parent", "--as-pid-1", "--hostname", "sandbox"]
    argv += ["--cap-drop", "ALL"]
    for cap in ("SYS_ADMIN", "SETUID", "SETGID", "SYS_RESOURCE"):  # what the init's set-up uses
        argv += ["--cap-add", f"CAP_{cap}"]
    dirs = list(_interpreter_dirs(python))
    for path in _LIB_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            dirs.append(path)
    dirs = sorted(set(dirs))
    dirs = [p for p in dirs if not any(p.startswith(q + "/") for q in dirs)]
    parents = {os.path.dirname(p) for p in dirs} - {"/"}
    for path in sorted({a for p in parents for a in _ancestors(p)}):
        argv += ["--perms", "0755", "--dir", path]  # else bubblewrap makes them 0700
    for path in dirs:
        argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in _NET_FILES if network else ():
        argv += ["--ro-bind-try", path, path]
    argv += ["--ro-bind", _CHILD, _BOOT_IN_BWRAP, "--proc", "/proc", "--dev", "/dev"]
    return (*argv, "--dir", "/tmp", "--chdir", "/")


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``[/a, /a/b, /a/b/c]``."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


@functools.cache
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """``python``'s installation: its prefixes (stdlib, site-packages) and its binary's dir."""
    ask = "import json, sys; print(json.dumps([sys.prefix, sys.exec_prefix, sys.base_prefix]))"
    try:
        run = subprocess.run([python, "-I", "-c", ask], env=_ENV, capture_output=True, timeout=60)
        prefixes = json.loads(run.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise SandboxError(f"cannot ask {python} for its prefixes: {e}") from e
    paths = [os.path.realpath(p) for p in [*prefixes, os.path.dirname(os.path.realpath(python))]]
    if "/" in paths:
        raise SandboxError(f"{python} is installed in /: the sandbox would show the whole host")
    return tuple(paths)
