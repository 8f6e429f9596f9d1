"""Learner -> rollout weight sync, versioned: every rollout records the version it sampled with.

Transport `dir` (CPU, or a single host): learner rank 0 writes the weights as safetensors into
a version folder in shared memory (`/dev/shm` when there is one), every rollout worker loads
them in place through `WeightSyncExtension.opd_load_from_dir`, and the previous folder is
removed. The folder is named after the driver (`opd-sync-<pid>@<host>.<random>`) and removed
when the run ends; one whose owner died (kill -9) is removed by the next run on that host.
The GPU transports (`nccl`: a broadcast into vLLM's workers on other GPUs; `ipc`: a CUDA IPC
handle to the learner's buffer for the worker on the same GPU) enter vLLM through the same
extension and end in the same `reload_weights` call.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from opd.cluster.group import ActorGroup, RoleError
from opd.rundir import clear_stale, owned_name

SYNC_PREFIX = "opd-sync-"


def default_sync_root() -> Path:
    """A new folder name in shared memory, after removing those of dead runs."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shm.stat().st_mode & 0o002 else Path(tempfile.gettempdir())
    clear_stale(base, SYNC_PREFIX)
    return base / owned_name(SYNC_PREFIX)


class DirWeightSync:
    def __init__(
        self,
        learners: ActorGroup,
        rollouts: ActorGroup,
        dtype: str,
        root: Path | None = None,
        teacher: ActorGroup | None = None,
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
        nbytes = sum(self.learners.call("export_to_dir", str(folder), self.dtype))
        t1 = time.perf_counter()
        args = (str(folder), version)
        loads = self.rollouts.submit_each("load_weights_from_dir", [args] * len(self.rollouts))
        update = None
        if self.teacher is not None and update_teacher:
            update = self.teacher.submit_each("update_from_dir", [args])
        # An actor that died meanwhile is restarted by Ray, given the previous weights, then
        # these (an EMA teacher is not restarted: the run stops).
        self.rollouts.collect(loads, lambda i: self.restore(self.rollouts, i))
        metrics = {}
        if update is not None:
            (norm,) = self.teacher.collect(update, lambda i: self.restore(self.teacher, i))
            metrics = {"teacher/update_norm": norm, "teacher/version": float(version)}
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
        method = "load_weights_from_dir" if group is self.rollouts else "update_from_dir"
        handle = group.handles[i]
        group.gather([getattr(handle, method).remote(str(self.current), self.version)], method)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class NcclWeightSync:
    """GPU transport: learner rank 0 broadcasts each weight over NCCL to every vLLM worker.

    vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`. Run on GPUs by `opd train` (a
    learner on one H200, vLLM on the other: 85 ms for 1.26 GB, benchmarks/RESULTS.md); the
    CPU tests use `dir`, since NCCL needs GPUs.
    """

    def __init__(
        self, learners: ActorGroup, rollouts: ActorGroup, dtype: str, tp_size: int = 1
    ) -> None:
        self.learners, self.rollouts, self.dtype = learners, rollouts, dtype
        address, port = learners.gather(
            [learners.handles[0].node_address.remote()], "node_address"
        )[0]
        world = 1 + tp_size * len(rollouts)
        refs = [
            h.init_weight_group.remote(address, port, 1 + i * tp_size, world)
            for i, h in enumerate(rollouts.handles)
        ]
        refs += [h.init_weight_group.remote(address, port, world) for h in learners.handles]
        learners.gather(refs, "init_weight_group")
        self.specs = learners.call("weight_specs", dtype)[0]
        self.version = 0

    def push(self, version: int, update_teacher: bool = True) -> dict[str, float]:
        t0 = time.perf_counter()
        receive = [h.receive_weights.remote(self.specs, version) for h in self.rollouts.handles]
        send = [h.broadcast_weights.remote(self.dtype) for h in self.learners.handles]
        nbytes = sum(self.learners.gather(send, "broadcast_weights"))
        self.rollouts.gather(receive, "receive_weights")
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
    against 1.69 s for `dir`; benchmarks/RESULTS.md), not yet with several ranks: the
    colocated default stays `dir`; choose it with `rollout.weight_sync: ipc`.
    """

    def __init__(self, learners: ActorGroup, rollouts: ActorGroup, dtype: str) -> None:
        if len(rollouts) > len(learners):
            raise ValueError(
                f"rollout.weight_sync=ipc pairs rollout worker i with learner rank i: "
                f"{len(rollouts)} rollout workers but {len(learners)} learner ranks"
            )
        self.learners, self.rollouts, self.dtype = learners, rollouts, dtype
        self.version = 0

    def _send(self, version: int, workers: list[int]) -> None:
        shared = self.learners.call("ipc_weights", self.dtype)  # one (entries, handle) per rank
        refs = [
            self.rollouts.handles[i].load_weights_from_ipc.remote(*shared[i], version)
            for i in workers
        ]
        self.rollouts.gather(refs, "load_weights_from_ipc")

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
    learners: ActorGroup,
    rollouts: ActorGroup,
    dtype: str,
    teacher: ActorGroup | None = None,
    colocated: bool = False,
):
    """`auto` picks NCCL on GPUs and the shared-memory folder on CPUs, or when learner and
    vLLM share GPUs (colocated: NCCL cannot join two processes on one GPU); a teacher that
    follows the student (sdft's EMA) is fed through the folder."""
    if transport == "auto":
        nccl = device == "cuda" and teacher is None and not colocated
        transport = "nccl" if nccl else "dir"
    if transport == "nccl":
        return NcclWeightSync(learners, rollouts, dtype)
    if transport == "ipc":
        return IpcWeightSync(learners, rollouts, dtype)
    return DirWeightSync(learners, rollouts, dtype, teacher=teacher)
