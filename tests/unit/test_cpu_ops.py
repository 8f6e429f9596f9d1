"""A lock file left by a killed build of DeepSpeed's CPU op must not hang the next learner."""

import subprocess
import sys

import pytest

from opd.learner.cpu_ops import shm_build_dir

BUILD = """
import importlib
{guard}
ds_torch = importlib.import_module("deepspeed.comm.torch")
assert ds_torch.build_shm_op() is not None
print("built")
"""
GUARD = "from opd.learner.cpu_ops import guard_shm_build; guard_shm_build()"


def _build(guard: bool, timeout: float) -> subprocess.CompletedProcess:
    code = BUILD.format(guard=GUARD if guard else "")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


def test_dead_builders_lock_is_cleared_and_the_op_builds():
    folder = shm_build_dir()
    if folder is None:
        pytest.skip("this accelerator has no shared-memory op")
    stale = folder / "lock"
    try:
        stale.touch()  # what a build killed halfway leaves
        out = _build(guard=True, timeout=600)  # compiles on a fresh machine
        assert out.returncode == 0, out.stderr[-3000:]
        assert "built" in out.stdout
        assert f"removing {stale}" in out.stderr
        assert not stale.exists()

        # DeepSpeed on its own waits on the same file forever
        stale.touch()
        with pytest.raises(subprocess.TimeoutExpired):
            _build(guard=False, timeout=10)
    finally:
        stale.unlink(missing_ok=True)
