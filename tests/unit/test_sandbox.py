"""Attack suite for opd.rewards.sandbox: hostile programs fail, stay bounded, leave no trace."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
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
    if where in ("tmp", "devshm") and sandbox.sandbox_mode() != "ns":
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
        assert res.status == "error" and "connected" not in res.stdout
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    assert res.network_isolated == (sandbox.sandbox_mode() == "ns")


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
