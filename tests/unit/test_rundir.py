"""One `opd train` per run directory (a second fails at once naming the holder; a dead
holder's lock never blocks), and nothing left behind: weight-sync folders and cache builds of
dead processes are removed by the next start, and a SIGTERM during a build removes its own."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from opd.rundir import RunDirLocked, RunError, RunLock, clear_stale, owned_name

RECIPE = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock until killed."""
    script = f"from opd.rundir import RunLock; RunLock({str(run_dir)!r}).acquire(); print('held')"
    proc = subprocess.Popen(
        [sys.executable, "-c", script + "; import time; time.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_fails_at_once_naming_the_holder_and_a_dead_holder_does_not_block(
    tmp_path,
):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path).acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass


def test_opd_train_on_a_locked_run_directory_exits_with_the_message(tmp_path):
    holder = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "opd.cli", "train", str(RECIPE), f"run.output_dir={tmp_path}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"is in use by another opd train (pid {holder.pid} on host" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "metrics.jsonl").exists()


def test_clear_stale_removes_only_folders_of_dead_owners_on_this_host(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f"opd-sync-{_dead_pid()}@{host}@0badc0de"
    alive = tmp_path / owned_name("opd-sync-")
    elsewhere = tmp_path / f"opd-sync-{_dead_pid()}@not-{host}@0badc0de"
    unknown = tmp_path / "opd-sync-0123456789ab"
    for d in (dead, alive, elsewhere, unknown):
        (d / "v3").mkdir(parents=True)
    assert clear_stale(tmp_path, "opd-sync-") == [dead]
    assert not dead.exists() and alive.exists() and elsewhere.exists() and unknown.exists()


def test_a_new_weight_sync_removes_the_folders_of_killed_runs():
    from opd.sync.weights import default_sync_root

    root = default_sync_root()
    stale = root.parent / f"opd-sync-{_dead_pid()}@{socket.gethostname()}@0badc0de"
    (stale / "v7").mkdir(parents=True)
    (stale / "v7" / "model.safetensors").write_bytes(b"0" * 1024)
    try:
        mine = default_sync_root()
        assert not stale.exists()
        assert mine.name.startswith(f"opd-sync-{os.getpid()}@")
    finally:
        import shutil

        shutil.rmtree(stale, ignore_errors=True)


_BUILD = """
import sys, time
from pathlib import Path
from opd.cache import build_folder

def build(tmp):
    (tmp / "part").write_text("half")
    print("building", flush=True)
    time.sleep(600)

build_folder(Path(sys.argv[1]), build)
"""


def _start_build(final: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_BUILD), str(final)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "building"
    return proc


def test_sigterm_during_a_cache_build_removes_its_temporary_folder(tmp_path):
    proc = _start_build(tmp_path / "tiny-v1")
    assert len(list(tmp_path.glob(".tiny-v1.*"))) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert list(tmp_path.iterdir()) == []


def test_a_build_removes_the_temporary_folders_of_killed_builds(tmp_path):
    from opd.cache import build_folder

    proc = _start_build(tmp_path / "tiny-v1")
    proc.kill()
    proc.wait()
    assert len(list(tmp_path.glob(".tiny-v1.*"))) == 1  # kill -9 leaves it
    build_folder(tmp_path / "tiny-v1", lambda tmp: (tmp / "done").write_text("ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]


def test_resuming_with_other_settings_is_refused_with_the_difference(tmp_path):
    from opd.config import load_config, to_yaml
    from opd.loop import check_same_run

    recipe = "recipes/reverse_kl/tiny.yaml"
    check_same_run(tmp_path, load_config(recipe))  # nothing saved yet: nothing to compare
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(recipe)))
    # run longer, watched differently: the same run
    check_same_run(tmp_path, load_config(recipe, ["trainer.steps=99", "run.progress=false"]))
    with pytest.raises(RunError) as e:
        check_same_run(tmp_path, load_config(recipe, ["learner.lr=0.5"]))
    message = str(e.value)
    assert "-learner.lr = 0.001\n+learner.lr = 0.5" in message, message
    assert "run.resume_changed=true" in message and "trainer.steps" not in message
    (tmp_path / "config.yaml").write_text("learner: [")
    with pytest.raises(RunError, match=r"config.yaml cannot be read"):
        check_same_run(tmp_path, load_config(recipe))
