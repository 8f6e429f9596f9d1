"""The sandbox bootstrap: what runs in the child that :mod:`opd.rewards.sandbox` launches.

The parent runs this file as a plain script, ``python -I -S sandbox_child.py ARGS``, so it must
stay standard-library only (no ``opd`` imports: neither site-packages nor the repo is on its
path). Three entry points:

``--boot CFG_JSON`` (program source on stdin)
  Sets up the sandbox for ``cfg["mode"]``, writes the program to ``main.py`` in its working dir,
  sends one ``R`` byte on ``cfg["ready_fd"]`` once setup is done (the parent's proof that the
  sandbox exists), then runs ``python -I main.py`` under the rlimits of ``cfg``. Its exit
  status is the program's. A failed setup prints ``opd-sandbox: setup failed: ...`` and never
  runs the program (the parent sees no ready byte).
``--init CFG_JSON`` (mode ``"bwrap"`` only: the half that runs inside bubblewrap)
  The init of the namespace, as described below.
``--kill-uid UID``
  Drops to ``UID`` and ``kill(-1, SIGKILL)``: every process of that uid, atomic against fork.

First, in every mode, ``--boot`` joins a new, empty session keyring, so the run does not
possess the caller's keys (skipped when the parent passes no ``keyctl`` number: no libseccomp).

Mode ``"bwrap"``: ``--boot`` runs ``cfg["bwrap"]`` (the bubblewrap command line the parent built:
new IPC, PID, UTS, cgroup and network namespaces, a new session, an empty root holding only the
interpreter, the system library dirs, this file, fresh ``/dev`` and ``/proc``) on
``python -I -S <this file> --init CFG_JSON`` as PID 1, as root with only the capabilities the
init needs (mount, setuid/setgid, rlimits).
Mode ``"ns"``: ``--boot`` unshares new mount, PID, IPC and UTS namespaces (and a network
namespace unless ``cfg["network"]``: it holds only a downed loopback) and forks the init.
The init (``_init``, PID 1 of the new PID namespace) then
  * in mode ``"ns"``: makes every inherited mount read-only and mounts a fresh ``/proc`` showing
    only sandbox processes; for interpreter dirs under a parent other users cannot traverse
    (pyenv in ``/root``), mounts a tmpfs over that parent and binds just those dirs back;
  * mounts a private tmpfs of ``dir_mb`` (4096 inodes) on ``/tmp``, owned by the run's uid
    (the program's cwd, HOME and TMPDIR), and a 1 MiB one on ``/dev/shm``;
  * forks the program, reaps every process and, when the program exits, writes its wait status
    to ``--boot`` and exits, so the kernel kills whatever the program left in the namespaces.
    ``--boot`` relays that status as its own (re-raising a signal).
Modes ``"uid"`` and ``"plain"``: the program is exec-ed directly in ``cfg["workdir"]``, with an
audit hook refusing ``socket.*`` unless ``cfg["network"]`` (no network namespace here).

Every mode, just before exec: fds above 2 closed, RLIMIT_CPU/AS/NPROC/CORE/FSIZE/NOFILE, then
(with ``cfg["uid"]``) no supplementary groups and uid = gid = ``cfg["uid"]`` (which clears every
capability), ``no_new_privs``, a parent-death SIGKILL (set after the uid change, which resets
it) and, last, the seccomp filter ``cfg["seccomp"]`` (hex of the BPF program the parent built
with :mod:`.sandbox_seccomp`); a minimal environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import sys

_NEWNS, _NEWUTS, _NEWIPC, _NEWPID, _NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 1, 38, 22, 2
_KEYCTL_JOIN_SESSION_KEYRING = 1
_RDONLY, _NOSUID, _NODEV, _NOEXEC, _REMOUNT, _BIND, _REC, _PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
_OPT_FLAGS = {
    "nosuid": _NOSUID,
    "nodev": _NODEV,
    "noexec": _NOEXEC,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
_SETUP_FAILED = 125
_AUDIT_HOOK = (
    "import runpy, sys\n"
    "def _deny(event, args):\n"
    "    if event.startswith('socket.'):\n"
    "        raise PermissionError('network disabled in sandbox: ' + event)\n"
    "sys.addaudithook(_deny)\nsys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):  # struct sock_fprog: what PR_SET_SECCOMP takes
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _sys(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(
    src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    enc = lambda s: None if s is None else s.encode()
    _sys(
        _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def _prctl(option: int, value: int) -> None:
    _sys(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _readonly_fs() -> None:
    _mount(None, "/", None, _REC | _PRIVATE)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")
        flags = sum(_OPT_FLAGS.get(o, 0) for o in fields[5].split(","))
        try:
            _mount(None, target, None, _BIND | _REMOUNT | _RDONLY | flags)
        except OSError:
            if target == "/":
                raise


def _expose(pairs: list[list[str]]) -> None:
    """Mount a tmpfs over each hidden top dir, then bind the needed paths back read-only."""
    tops: dict[str, list[tuple[str, int]]] = {}
    for top, path in pairs:
        tops.setdefault(top, []).append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    for top, items in tops.items():
        _mount("tmpfs", top, "tmpfs", _NOSUID | _NODEV, "mode=755,size=1m")
        for path, fd in items:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, _BIND | _REC)
            _mount(None, path, None, _BIND | _REMOUNT | _RDONLY | _NOSUID | _NODEV)
            os.close(fd)
        _mount(None, top, None, _REMOUNT | _RDONLY | _NOSUID | _NODEV, "mode=755,size=1m")


def _setup_namespace(cfg: dict) -> str:
    if cfg["mode"] == "ns":  # (in mode "bwrap", bubblewrap made the root, /proc and /dev)
        _readonly_fs()
        _expose(cfg["expose"])
        _mount("proc", "/proc", "proc", _NOSUID | _NODEV | _NOEXEC)
    uid, opts = cfg["uid"], f"size={cfg['dir_mb']}m,nr_inodes=4096"
    _mount("tmpfs", "/tmp", "tmpfs", _NOSUID | _NODEV, f"mode=700,uid={uid},gid={uid},{opts}")
    shm = "mode=1777,size=1m,nr_inodes=256"
    _mount("tmpfs", "/dev/shm", "tmpfs", _NOSUID | _NODEV | _NOEXEC, shm)
    return "/tmp"


def _new_session_keyring(keyctl_nr: int | None) -> None:
    """Replace the inherited session keyring (the caller's keys) by a new, empty one."""
    if keyctl_nr is None:
        return
    join = ctypes.c_long(_KEYCTL_JOIN_SESSION_KEYRING)
    failed = _libc.syscall(ctypes.c_long(keyctl_nr), join, None) < 0
    # EPERM / ENOSYS: an outer seccomp filter (docker's) denies keys to us and so to the run too
    if failed and ctypes.get_errno() not in (errno.EPERM, errno.ENOSYS):
        _sys(-1, "keyctl(JOIN_SESSION_KEYRING)")


def _install_filter(bpf: bytes) -> None:
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    ret = _libc.prctl(
        _PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0
    )
    _sys(ret, "prctl(PR_SET_SECCOMP)")


def _exec_program(cfg: dict, workdir: str, code: bytes) -> None:
    with open(os.path.join(workdir, "main.py"), "wb") as f:
        f.write(code)
    os.chdir(workdir)
    os.write(cfg["ready_fd"], b"R")
    os.closerange(3, 1 << 20)
    cpu, mb = cfg["cpu_s"], 1 << 20
    for res, soft in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
        (resource.RLIMIT_NPROC, cfg["max_processes"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb),
        (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
    ):
        resource.setrlimit(res, (soft, soft + 1 if res == resource.RLIMIT_CPU else soft))
    if cfg["uid"] is not None:
        _become(cfg["uid"])
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot raise privileges
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # reset by setuid, so set it afterwards
    env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
    hook = [] if cfg["netns"] or cfg["network"] else ["-c", _AUDIT_HOOK]
    if cfg["seccomp"]:
        _install_filter(bytes.fromhex(cfg["seccomp"]))  # last: it also denies what set-up uses
    os.execve(cfg["python"], [cfg["python"], "-I", *hook, "main.py"], env)


def _init(cfg: dict, status_fd: int) -> None:
    """The namespace's init: set it up, run the program, report its wait status."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    code = _read_program()
    workdir = _setup_namespace(cfg)
    pid = os.fork()
    if pid == 0:
        _exec_program(cfg, workdir, code)
    while True:
        done, status = os.wait()
        if done == pid:
            os.write(status_fd, str(status).encode())
            os._exit(0)  # the kernel now kills whatever the program left behind


def _relay(init_pid: int, status_r: int) -> None:
    os.waitpid(init_pid, 0)
    raw = os.read(status_r, 64)
    code = os.waitstatus_to_exitcode(int(raw)) if raw else -signal.SIGKILL
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def _read_program() -> bytes:
    code = sys.stdin.buffer.read()
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    return code


def _exec_bwrap(cfg: dict, status_fd: int) -> None:
    """Run ``--init`` inside bubblewrap; the program source stays on stdin for it."""
    os.set_inheritable(status_fd, True)
    inner = json.dumps(dict(cfg, bwrap=None, status_fd=status_fd))
    argv = [*cfg["bwrap"], "--", cfg["python"], "-I", "-S", cfg["boot"], "--init", inner]
    os.execve(argv[0], argv, cfg["env"])


def _boot(cfg: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _new_session_keyring(cfg["keyctl_nr"])
    if cfg["mode"] in ("uid", "plain"):
        _exec_program(cfg, cfg["workdir"], _read_program())
    if cfg["mode"] == "ns":
        flags = _NEWNS | _NEWPID | _NEWIPC | _NEWUTS | (_NEWNET if cfg["netns"] else 0)
        _sys(_libc.unshare(flags), "unshare")
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        _guarded(_init if cfg["mode"] == "ns" else _exec_bwrap, cfg, status_w)
    os.close(status_w)
    _relay(pid, status_r)


def _become(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _kill_uid(uid: int) -> None:
    _become(uid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)  # every process of this uid, atomically w.r.t. fork


def _guarded(fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - report any setup failure, never run on
        os.write(2, f"opd-sandbox: setup failed: {e!r}\n".encode())
        os._exit(_SETUP_FAILED)


if __name__ == "__main__":
    if sys.argv[1] == "--kill-uid":
        _guarded(_kill_uid, int(sys.argv[2]))
    elif sys.argv[1] == "--init":
        cfg = json.loads(sys.argv[2])
        _guarded(_init, cfg, cfg["status_fd"])
    else:
        _guarded(_boot, json.loads(sys.argv[2]))
    sys.exit(0)
