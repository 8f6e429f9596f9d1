"""DeepSpeed's CPU shared-memory all-reduce op, built so that a killed build cannot hang later runs.

On CPU, `deepspeed.init_distributed` builds (or re-checks) the `deepspeed_shm_comm` op with
torch's cpp_extension, whose lock is a plain file, `<build dir>/lock`, that only its holder
removes. A process killed while holding it (a learner stopped during its first minute, a timeout
during the first compile) leaves the file behind, and every later start waits on it forever.

`guard_shm_build` makes every opd process build that op under a kernel flock, which the kernel
drops however its holder dies. A `lock` file found while holding the flock therefore belongs to a
dead process (another opd process would hold the flock), and is removed before building.
"""

from __future__ import annotations

import fcntl
import importlib
from pathlib import Path

from opd.rundir import warn

FLOCK_NAME = "opd-build.flock"


def shm_build_dir() -> Path | None:
    """The op's build folder, or None where the accelerator has no shared-memory op (GPUs)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return Path(_get_build_directory(builder.name, verbose=False))


def build_shm_op_guarded(build):
    """Run `build` (DeepSpeed's own builder) holding the flock, after clearing a dead lock."""
    folder = shm_build_dir()
    if folder is None:
        return build()
    with open(folder / FLOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                warn(f"removing {stale}: left by a build whose process died")
                stale.unlink(missing_ok=True)
            return build()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def guard_shm_build() -> None:
    """Route DeepSpeed's CPU op build (called inside `init_distributed`) through the flock."""
    # `import deepspeed.comm.torch` would name torch itself: deepspeed.comm imports torch
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch.build_shm_op
    if getattr(original, "opd_guarded", False):
        return

    def guarded():
        return build_shm_op_guarded(original)

    guarded.opd_guarded = True
    ds_torch.build_shm_op = guarded


def prebuild() -> None:
    """Build the op now (the CPU install does), so that no run pays its minute of compiling."""
    guard_shm_build()
    if importlib.import_module("deepspeed.comm.torch").build_shm_op() is None:
        print("DeepSpeed's shared-memory op does not apply here; nothing to build")
