"""Attack suite for opd.rewards.sandbox: hostile programs fail, stay bounded, leave no trace."""

from __future__ import annotations

import ctypes
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from opd.rewards import sandbox, sandbox_child
from opd.rewards.code import code_reward, humaneval_program
from opd.rewards.sandbox import run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


def _run(code: str, **kw) -> sandbox.SandboxResult:
    return run_python(textwrap.dedent(code), **kw)


def _assert_nothing_reached(res, listener) -> None:
    """The sandboxed program failed to connect, and the host's listener never saw it."""
    assert res.status == "error" and "connected" not in res.stdout
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
        listener.accept()


# ------------------------------------------------------------------------------- normal cases
def test_correct_code_passes():
    res = _run("print(sum(range(10)))")
    assert res.status == "ok" and res.returncode == 0
    assert res.stdout == "45\n"


def test_wrong_code_fails():
    res = _run("assert 1 + 1 == 3, 'bad maths'")
    assert res.status == "error" and res.returncode == 1
    assert "AssertionError: bad maths" in res.stderr


def test_syntax_error_fails():
    res = _run("def f(:\n    return 1\n")
    assert res.status == "error"
    assert "SyntaxError" in res.stderr


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("OPD_FAKE_SECRET", "hunter2")
    res = _run("import os; print(dict(os.environ)); print(os.getcwd(), os.getuid())")
    assert res.ok
    assert "hunter2" not in res.stdout and "OPD_FAKE_SECRET" not in res.stdout
    assert res.stdout.split()[-1] != "0"  # never root


HE_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''
HE_TEST = """

METADATA = {'author': 'jt', 'dataset': 'test'}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False
"""
HE_BODY = """    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False
"""


def test_humaneval_body_full_def_and_wrong_answer():
    record = {"prompt": HE_PROMPT, "test": HE_TEST, "entry_point": "has_close_elements"}
    assert code_reward(record, HE_BODY) == 1.0
    fenced = (
        "Here you go:\n```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers, threshold):\n" + HE_BODY + "```\nDone."
    )
    assert code_reward(record, fenced) == 1.0
    assert code_reward(record, "    return False\n") == 0.0
    assert code_reward(record, "    return (\n") == 0.0  # syntax error


def test_code_reward_accepts_objects_and_assert_lists():
    class Rec:
        prefix = "def add(a, b):\n"
        tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
        entry_point = "add"

    assert code_reward(Rec(), "    return a + b\n") == 1.0
    assert code_reward(Rec(), "    return a * b\n") == 0.0
    program = humaneval_program(Rec.prefix, "    return a + b\n", "\n".join(Rec.tests), "add")
    assert "check(" not in program


def test_ordinary_programs_still_run():
    """Threads, processes, asyncio and subprocesses work under the syscall filter (glibc falls
    back from clone3 to clone) and in the bare filesystem of mode "bwrap"."""
    res = _run(
        """
        import asyncio, multiprocessing, subprocess, sys, tempfile, threading

        def square(x):
            return x * x

        async def answer():
            await asyncio.sleep(0.01)
            return 42

        t = threading.Thread(target=print, args=("thread",))
        t.start(); t.join()
        with multiprocessing.Pool(2) as pool:
            print(pool.map(square, range(4)))
        print(asyncio.run(answer()))
        print(subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True,
                             text=True, check=True).stdout.strip())
        with tempfile.TemporaryDirectory() as d:
            open(d + "/x", "w").write("ok")
    """,
        timeout_s=30,
    )
    assert res.ok, res.stderr
    assert res.stdout.split("\n")[:4] == ["thread", "[0, 1, 4, 9]", "42", "child"]
    assert res.mode == sandbox.sandbox_mode()


# ------------------------------------------------------------------------------------ attacks
def test_infinite_loop_times_out():
    res = _run("while True:\n    pass\n", timeout_s=1.5)
    assert res.status == "timeout"
    assert res.seconds < 5


def test_cpu_limit_kills_busy_loop():
    res = _run("while True:\n    pass\n", timeout_s=10, cpu_s=1)
    assert res.status == "killed" and res.returncode == -signal.SIGXCPU
    assert res.seconds < 9  # 1 s of CPU time, however loaded the host is


def test_fork_bomb_is_contained():
    res = _run(
        """
        import os, time
        print(os.getuid(), flush=True)
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    while True:
                        try:
                            os.fork()
                        except OSError:
                            time.sleep(0.01)
                n += 1
        except OSError:
            print("blocked after", n, flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """,
        timeout_s=3.0,
        max_processes=16,
    )
    assert res.status == "timeout" and res.seconds < 10
    lines = res.stdout.splitlines()
    uid, blocked = int(lines[0]), int(lines[1].split()[-1])
    assert blocked < 16
    if os.geteuid() == 0:
        assert uid != 0 and sandbox._uid_pids(uid) == []  # nothing of the sandbox uid is left
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still fork


def test_escaped_daemon_is_killed():
    res = _run(
        """
        import os, time
        print(os.getuid(), flush=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.close(1); os.close(2)
                time.sleep(60)
            os._exit(0)
        os.wait()
    """,
        timeout_s=5.0,
    )
    assert res.status == "ok"
    if os.geteuid() == 0:
        assert sandbox._uid_pids(int(res.stdout.split()[0])) == []


def test_huge_allocation_fails():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = _run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert res.status == "error" and "MemoryError" in res.stderr
    res = _run("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\n", memory_mb=256, timeout_s=10)
    assert res.status == "error" and "MemoryError" in res.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_file_size_limit():
    res = _run("open('big', 'wb').write(b'x' * (32 << 20))", max_file_mb=16)
    assert res.status == "error" and "File too large" in res.stderr


@pytest.mark.parametrize(
    "where", ["repo", "root", "tmp", "devshm", "sandbox_module", "sandbox_child_module"]
)
def test_writes_outside_the_sandbox_leave_no_trace(where):
    name = f"pwned-{uuid.uuid4().hex}"
    target = {
        "repo": os.path.join(os.getcwd(), name),
        "root": os.path.expanduser(f"~/{name}"),
        "tmp": f"/tmp/{name}",
        "devshm": f"/dev/shm/{name}",
        "sandbox_module": sandbox.__file__,
        "sandbox_child_module": sandbox_child.__file__,
    }[where]
    before = open(target, "rb").read() if os.path.exists(target) else None
    res = _run(f"open({target!r}, 'a').write('pwned')\nraise SystemExit(1)")
    assert res.status == "error"
    after = open(target, "rb").read() if os.path.exists(target) else None
    if where in ("tmp", "devshm") and sandbox.sandbox_mode() not in ("bwrap", "ns"):
        pytest.skip("no private /tmp without a mount namespace")  # documented fallback gap
    assert after == before
    if before is None:
        assert not os.path.exists(target)


def test_network_connect_fails():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        res = _run(
            f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"exfiltrated")
            print("connected")
        """,
            timeout_s=10,
        )
        _assert_nothing_reached(res, listener)
    finally:
        listener.close()
    assert res.network_isolated == (sandbox.sandbox_mode() in ("bwrap", "ns"))


def test_cannot_kill_parent_or_test_process():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        res = _run(
            f"""
            import os, signal
            for pid in (os.getppid(), {os.getpid()}, {victim.pid}, -1):
                try:
                    os.kill(pid, signal.SIGKILL)
                    print("sent", pid)
                except OSError as e:
                    print("refused", pid, type(e).__name__)
            raise SystemExit(3)
        """,
            timeout_s=10,
        )
        assert res.status == "error" and res.returncode == 3
        assert f"refused {os.getpid()}" in res.stdout and f"refused {victim.pid}" in res.stdout
        assert victim.poll() is None  # the host process is alive
    finally:
        victim.kill()
        victim.wait()


def test_stdout_flood_is_capped():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    res = _run(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        max_output_bytes=10_000,
        timeout_s=20,
    )
    assert res.status == "output_limit" and len(res.stdout) == 10_000
    res = _run(
        "import os\nwhile True:\n    os.write(2, b'y' * 65536)\n",
        max_output_bytes=10_000,
        timeout_s=20,
    )
    assert res.status == "output_limit" and len(res.stderr) == 10_000
    assert time.monotonic() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_concurrent_runs_are_independent():
    results: list[sandbox.SandboxResult] = []
    code = "import os, time\ntime.sleep(0.3)\nprint(os.getuid())"
    threads = [threading.Thread(target=lambda: results.append(run_python(code))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results)
    if os.geteuid() == 0:
        assert len({r.stdout for r in results}) == 4  # one uid (and NPROC budget) per run


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid fallback needs root")
def test_uid_fallback_reaps_escaped_children():
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no system python (readable by unprivileged uids) to test the fallback")
    limits = {
        "cpu_s": 5,
        "memory_mb": 256,
        "max_processes": 8,
        "max_file_mb": 1,
        "max_open_files": 64,
        "dir_mb": 16,
    }
    code = (
        "import os, time\nprint(os.getuid(), flush=True)\n"
        "if os.fork() == 0:\n    os.setsid(); os.close(1); os.close(2); time.sleep(60)\n"
    )
    res = sandbox._run(code, "uid", python, 5.0, 10_000, False, limits)
    assert res.ok and not res.network_isolated
    assert sandbox._uid_pids(int(res.stdout.split()[0])) == []


# ---------------------------------------------------------- isolation: IPC, keys, files, syscalls
# Each of these leaked from a graded completion once. They need root (namespaces and the uid drop
# exist only then); CI runs as root, so they run there.
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="isolation check NOT RUN: needs root (without root the sandbox is mode 'plain': "
    "no namespaces, no uid drop, nothing to check); CI runs it as root",
)
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap", path=sandbox._ENV["PATH"]) is None,
    reason="filesystem-view check NOT RUN: bubblewrap (bwrap) is not installed, and the 'ns' "
    "fallback shows the host filesystem read-only by design",
)
_NR = {  # syscalls glibc has no wrapper for
    "x86_64": {"add_key": 248, "keyctl": 250, "clone": 56},
    "aarch64": {"add_key": 217, "keyctl": 219, "clone": 220},
}.get(os.uname().machine, {})
_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000
_KEYCTL_GET_KEYRING_ID, _KEYCTL_SEARCH, _KEYCTL_READ, _KEYCTL_INVALIDATE = 0, 10, 11, 21
_SESSION_KEYRING = -3


def _own_ipc() -> str:
    """Modes with an IPC namespace allow IPC in it; the others' syscall filter refuses it."""
    return "ALLOWED" if sandbox.sandbox_mode() in ("bwrap", "ns") else "REFUSED"


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _sysv_keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(line.split()[0]) for line in list(f)[1:]}


def _verdicts(res: sandbox.SandboxResult) -> dict[str, str]:
    """The program prints ``<what> <ALLOWED|REFUSED> ...`` lines."""
    assert res.ok, res.stderr
    return {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.strip()}


@needs_root
@needs_bwrap
def test_root_gets_the_full_sandbox():
    assert sandbox.sandbox_mode() == "bwrap"  # else the probe's warning says why it fell back
    res = _run("print(open('/proc/self/status').read())")
    status = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    assert res.mode == "bwrap" and res.syscall_filter and res.network_isolated
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[caps], 16) == 0, caps


_TRY = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def report(what, ret):
    ok = ret is not None and ret >= 0
    err = "" if ok else os.strerror(ctypes.get_errno())
    print(what, "ALLOWED" if ok else "REFUSED", ret, err, flush=True)
"""


@needs_root
def test_sysv_shm_is_private_and_gone_after_the_run():
    libc = _libc()
    host_key, own_key = (random.randrange(1, 1 << 30) for _ in range(2))
    host_id = libc.shmget(host_key, 4096, 0o1000 | 0o2000 | 0o666)  # IPC_CREAT | IPC_EXCL
    assert host_id >= 0, os.strerror(ctypes.get_errno())
    try:
        res = _run(
            _TRY
            + f"""
report("see_host_key", libc.shmget({host_key}, 0, 0))
report("see_host_list", 0 if "{host_key}" in open("/proc/sysvipc/shm").read() else -1)
report("create", libc.shmget({own_key}, 64 << 20, 0o1000 | 0o600))
"""
        )
        verdicts = _verdicts(res)
        assert verdicts["create"] == _own_ipc()  # inside its own IPC namespace
        assert verdicts["see_host_key"] == verdicts["see_host_list"] == "REFUSED"
        assert own_key not in _sysv_keys("shm")  # died with the run's IPC namespace
    finally:
        for key in (host_key, own_key):
            if (shmid := libc.shmget(key, 0, 0)) >= 0:
                libc.shmctl(shmid, 0, None)  # IPC_RMID


@needs_root
def test_posix_mqueue_is_private_and_gone_after_the_run():
    libc = _libc()
    host_name, own_name = (f"/opd-test-{uuid.uuid4().hex}".encode() for _ in range(2))
    old = os.umask(0)  # the queue must be openable by the run's uid: only the namespace hides it
    try:
        fd = libc.mq_open(host_name, os.O_CREAT | os.O_RDWR, 0o666, None)
    finally:
        os.umask(old)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    os.close(fd)
    try:
        res = _run(
            _TRY
            + f"""
report("see_host", libc.mq_open({host_name!r}, os.O_RDWR))
report("create", libc.mq_open({own_name!r}, os.O_CREAT | os.O_RDWR, 0o600, None))
"""
        )
        verdicts = _verdicts(res)
        assert verdicts["create"] == _own_ipc() and verdicts["see_host"] == "REFUSED"
        leaked = libc.mq_open(own_name, os.O_RDONLY)
        if leaked >= 0:
            os.close(leaked)
        assert leaked < 0, "the run's message queue outlived it"
    finally:
        for name in (host_name, own_name):
            libc.mq_unlink(name)


@needs_root
@pytest.mark.skipif(not _NR, reason="no keyctl syscall numbers for this architecture")
def test_caller_session_keyring_is_unreachable():
    libc = _libc()
    desc, secret = f"opd-test-{uuid.uuid4().hex}".encode(), b"hunter2-keyring"
    serial = libc.syscall(
        ctypes.c_long(_NR["add_key"]),
        b"user",
        desc,
        secret,
        ctypes.c_size_t(len(secret)),
        ctypes.c_long(_SESSION_KEYRING),
    )
    assert serial > 0, os.strerror(ctypes.get_errno())
    try:
        res = _run(
            _TRY
            + f"""
buf = ctypes.create_string_buffer(256)
report("read", libc.syscall({_NR["keyctl"]}, {_KEYCTL_READ}, {serial}, buf, 256))
print("payload", buf.value.decode(errors="replace") or "-")
report("search", libc.syscall({_NR["keyctl"]}, {_KEYCTL_SEARCH}, {_SESSION_KEYRING}, b"user",
                               {desc!r}, 0))
"""
        )
        assert secret.decode() not in res.stdout
        verdicts = _verdicts(res)
        assert verdicts["read"] == verdicts["search"] == "REFUSED"
    finally:
        libc.syscall(
            ctypes.c_long(_NR["keyctl"]), ctypes.c_long(_KEYCTL_INVALIDATE), ctypes.c_long(serial)
        )


@needs_root
@needs_bwrap
def test_host_unix_socket_is_unreachable():
    where = tempfile.mkdtemp(prefix="opd-test-sock-", dir="/var/tmp")  # outside any scratch dir
    os.chmod(where, 0o755)
    path = os.path.join(where, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(8)
        res = _run(
            f"""
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect({path!r})
            s.sendall(b"exfiltrated")
            print("connected")
        """
        )
        _assert_nothing_reached(res, listener)
    finally:
        listener.close()
        shutil.rmtree(where, ignore_errors=True)


@needs_root
@needs_bwrap
@pytest.mark.parametrize("what", ["etc_passwd", "checkout", "this_test", "other_run"])
def test_host_files_are_not_visible(what):
    other = tempfile.mkdtemp(prefix="opd-sandbox-", dir="/var/tmp")  # like another run's dir
    os.chmod(other, 0o755)
    with open(os.path.join(other, "main.py"), "w") as f:
        f.write("SECRET = 'other-run'\n")
    os.chmod(f.name, 0o644)
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = {
        "etc_passwd": "/etc/passwd",
        "checkout": os.path.join(checkout, "pyproject.toml"),
        "this_test": os.path.abspath(__file__),
        "other_run": f.name,
    }[what]
    try:
        res = _run(f"print(open({target!r}).read()[:40])")
        assert res.status == "error", res.stdout
        assert "FileNotFoundError" in res.stderr or "PermissionError" in res.stderr
    finally:
        shutil.rmtree(other, ignore_errors=True)


@needs_root
@pytest.mark.skipif(not _NR, reason="no syscall numbers for this architecture")
def test_dangerous_syscalls_are_refused():
    res = _run(
        _TRY
        + f"""
def forked(what, attempt):  # each in a fresh child: one success must not mask the next
    pid = os.fork()
    if pid == 0:
        report(what, attempt())
        os._exit(0)
    os.waitpid(pid, 0)

def os_unshare():
    if not hasattr(os, "unshare"):  # Python < 3.12
        return libc.unshare({_CLONE_NEWUSER})
    try:
        os.unshare(os.CLONE_NEWUSER)
        return 0
    except OSError as e:
        ctypes.set_errno(e.errno)
        return -1

def clone_userns():
    pid = libc.syscall({_NR["clone"]}, {_CLONE_NEWUSER} | 17, 0, 0, 0, 0)  # | SIGCHLD
    if pid == 0:
        os._exit(0)
    return pid

def mount():
    if libc.unshare({_CLONE_NEWUSER | _CLONE_NEWNS}) == 0:  # be root of a new user namespace
        open("/proc/self/setgroups", "w").write("deny")
        open("/proc/self/uid_map", "w").write(f"0 {{os.geteuid()}} 1")
    return libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)

forked("os_unshare", os_unshare)
forked("clone_userns", clone_userns)
forked("mount", mount)
forked("ptrace", lambda: libc.ptrace(0, 0, None, None))  # PTRACE_TRACEME
forked("keyctl", lambda: libc.syscall({_NR["keyctl"]}, {_KEYCTL_GET_KEYRING_ID},
                                      {_SESSION_KEYRING}, 0))
forked("add_key", lambda: libc.syscall({_NR["add_key"]}, b"user", b"k", b"v", 1,
                                       {_SESSION_KEYRING}))
"""
    )
    verdicts = _verdicts(res)
    assert set(verdicts) == {"os_unshare", "clone_userns", "mount", "ptrace", "keyctl", "add_key"}
    assert verdicts == dict.fromkeys(verdicts, "REFUSED"), res.stdout
