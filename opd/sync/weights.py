"""Learner -> rollout weight sync, versioned: every rollout records the version it sampled with.

Transport `dir` (CPU, or a single host): learner rank 0 writes the weights as safetensors into
a version folder in shared memory (`/dev/shm` when there is one), every rollout worker loads
them in place through `WeightSyncExtension.opd_load_from_dir` (a LoRA student writes its
adapter folder instead, which the workers serve as a vLLM LoRA adapter), and the previous
folder is removed. The folder is named after the driver (`opd-sync-<pid>@<host>.<random>`)
and removed when the run ends; one whose owner died (kill -9) is removed by the next run on
that host.
The GPU transports (`nccl`: a broadcast into vLLM's workers on other GPUs; `ipc`: a CUDA IPC
handle to the learner's buffer for the worker on the same GPU) enter vLLM through the same
extension and end in the same `reload_weights` call.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

from opd.cluster.group import ActorGroup, RoleError
from opd.cluster.role_groups import LearnerGroup, RolloutGroup, TeacherGroup
from opd.rundir import clear_stale, owned_name

SYNC_PREFIX = "opd-sync-"


class WeightSync(Protocol):
    """A transport of the learner's weights to the rollout engines (and a following teacher).

    `version` is the policy version the engines hold: every sample records the version it was
    sampled with, and a restarted actor is brought back to it (`restore`)."""

    version: int

    def push(self, version: int, update_teacher: bool = True) -> dict[str, float]:
        """Send the learner's current weights as `version`; the transport's metrics."""
        ...

    def restore(self, group: ActorGroup, i: int) -> None:
        """Give actor i of `group`, restarted by Ray with its initial weights, the current
        ones (or raise RoleError where the transport cannot)."""
        ...

    def close(self) -> None: ...


def default_sync_root() -> Path:
    """A new folder name in shared memory, after removing those of dead runs."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shm.stat().st_mode & 0o002 else Path(tempfile.gettempdir())
    clear_stale(base, SYNC_PREFIX)
    return base / owned_name(SYNC_PREFIX)


class DirWeightSync:
    def __init__(
        self,
        learners: LearnerGroup,
        rollouts: RolloutGroup,
        dtype: str,
        root: Path | None = None,
        teacher: TeacherGroup | None = None,
    ) -> None:
        self.learners, self.rollouts, self.dtype = learners, rollouts, dtype
        self.teacher = teacher  # a self-distillation teacher that follows the student
        self.root = root or default_sync_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.current: Path | None = None
        self.version = 0

    def push(self, version: int, update_teacher: bool = True) -> dict[str, float]:
        """Send the learner's weights to every rollout worker (and to a following teacher,
        which applies its EMA; a resume re-sends to the rollouts and a live teacher only)."""
        t0 = time.perf_counter()
        folder = self.root / f"v{version}"
        nbytes = self.learners.export_to_dir(str(folder), self.dtype)
        t1 = time.perf_counter()
        loads = self.rollouts.submit_load_from_dir(str(folder), version)
        update = None
        if self.teacher is not None and update_teacher:
            update = self.teacher.submit_update(str(folder), version)
        # An actor that died meanwhile is restarted by Ray, given the previous weights, then
        # these (an EMA teacher is not restarted: the run stops).
        self.rollouts.collect(loads, lambda i: self.restore(self.rollouts, i))
        metrics = {}
        if update is not None:
            norms = self.teacher.collect(update, lambda i: self.restore(self.teacher, i))
            if len(norms) > 1:  # replicas: the same pushes from the same state, the same result
                from opd.teacher.pool import check_versions

                check_versions(self.teacher, self.teacher.versions())
                if max(norms) - min(norms) > 1e-6 * max(1.0, max(norms)):
                    raise RoleError(
                        f"teacher replicas moved by different amounts on push {version}: "
                        f"{norms}; they must apply the same updates from the same state"
                    )
            metrics = {"teacher/update_norm": norms[0], "teacher/version": float(version)}
        t2 = time.perf_counter()
        if self.current is not None and self.current != folder:
            shutil.rmtree(self.current, ignore_errors=True)
        self.current, self.version = folder, version
        return {
            "sync/bytes": float(nbytes),
            "sync/export_s": t1 - t0,
            "sync/load_s": t2 - t1,
            **metrics,
        }

    def restore(self, group: ActorGroup, i: int) -> None:
        """Re-send the current weights to actor i of `group` (rollouts, or a teacher that
        follows the student) after Ray restarted it with the initial ones."""
        if self.current is None:
            return
        if group is self.rollouts:
            self.rollouts.load_one_from_dir(i, str(self.current), self.version)
        elif group is self.teacher:
            self.teacher.update_one(i, str(self.current), self.version)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class NcclWeightSync:
    """GPU transport: learner rank 0 broadcasts each weight over NCCL to every vLLM worker.

    vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`. Run on GPUs by `opd train` (a
    learner on one H200, vLLM on the other: 85 ms for 1.26 GB, benchmarks/RESULTS.md); the
    CPU tests use `dir`, since NCCL needs GPUs.
    """

    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup, dtype: str) -> None:
        self.learners, self.rollouts, self.dtype = learners, rollouts, dtype
        address, port = learners.node_address()
        world = 1 + len(rollouts)  # learner rank 0, then one vLLM engine per worker
        joining = rollouts.submit_init_weight_group(address, port, list(range(1, world)), world)
        learners.wait(learners.submit_init_weight_group(address, port, world))
        rollouts.wait(joining)
        self.specs = learners.weight_specs(dtype)
        self.version = 0

    def push(self, version: int, update_teacher: bool = True) -> dict[str, float]:
        t0 = time.perf_counter()
        receive = self.rollouts.submit_receive_weights(self.specs, version)
        nbytes = sum(self.learners.wait(self.learners.submit_broadcast_weights(self.dtype)))
        self.rollouts.wait(receive)
        self.version = version
        return {"sync/bytes": float(nbytes), "sync/broadcast_s": time.perf_counter() - t0}

    def restore(self, group: ActorGroup, i: int) -> None:
        if self.version == 0 or group is not self.rollouts:  # the teacher is frozen here
            return
        raise RoleError(
            f"{group.role}[{i}] was restarted, but a restarted vLLM engine cannot rejoin the "
            "NCCL weight group: use rollout.weight_sync=dir to survive rollout restarts"
        )

    def close(self) -> None:
        pass


class IpcWeightSync:
    """Colocated GPU transport: learner rank i copies the full weights into one flat buffer on
    its GPU and hands rollout worker i, on the same GPU, a CUDA IPC handle to it; the worker
    copies from views of that buffer into vLLM's weights (no host round trip, no file).

    Run in `opd train` with one learner rank and one worker on an H100 (0.127 s per 1.26 GB
    against 1.69 s for `dir`; benchmarks/RESULTS.md), and with two ranks on two H200s
    (tests/gpu/test_train_gpu.py): the colocated default on GPUs.
    """

    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup, dtype: str) -> None:
        if len(rollouts) > len(learners):
            raise ValueError(
                f"rollout.weight_sync=ipc pairs rollout worker i with learner rank i: "
                f"{len(rollouts)} rollout workers but {len(learners)} learner ranks"
            )
        self.learners, self.rollouts, self.dtype = learners, rollouts, dtype
        self.version = 0

    def _send(self, version: int, workers: list[int]) -> None:
        shared = self.learners.ipc_weights(self.dtype)  # one (entries, handle) per rank
        self.rollouts.load_from_ipc(shared, workers, version)

    def push(self, version: int, update_teacher: bool = True) -> dict[str, float]:
        t0 = time.perf_counter()
        self._send(version, list(range(len(self.rollouts))))
        self.version = version
        return {"sync/ipc_s": time.perf_counter() - t0}

    def restore(self, group: ActorGroup, i: int) -> None:
        if self.version and group is self.rollouts:
            self._send(self.version, [i])

    def close(self) -> None:
        pass


def make_weight_sync(
    transport: str,
    device: str,
    learners: LearnerGroup,
    rollouts: RolloutGroup,
    dtype: str,
    teacher: TeacherGroup | None = None,
    colocated: bool = False,
    lora: bool = False,
) -> WeightSync:
    """`auto` picks, on GPUs, CUDA IPC when learner and vLLM share them (colocated: NCCL
    cannot join two processes on one GPU) and NCCL when split; the shared-memory folder on
    CPUs, wherever a teacher follows the student (sdft's EMA), which only it feeds, and for a
    LoRA student, whose pushes are adapter folders (`learner.lora`)."""
    if transport == "auto":
        if device != "cuda" or teacher is not None or lora:
            transport = "dir"
        else:
            transport = "ipc" if colocated else "nccl"
    if transport == "nccl":
        return NcclWeightSync(learners, rollouts, dtype)
    if transport == "ipc":
        return IpcWeightSync(learners, rollouts, dtype)
    return DirWeightSync(learners, rollouts, dtype, teacher=teacher)
