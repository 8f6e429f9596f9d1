"""The three roles' actor groups, with named methods: the only place that knows the actors'
method names. Calls that the driver waits for return values; `submit_*` calls return a
`Pending` to gather later (`collect`), which is how work overlaps and survives restarts."""

from __future__ import annotations

from typing import Any

from opd.cluster.group import ActorGroup, Pending


class LearnerGroup(ActorGroup):
    """DeepSpeed data-parallel ranks; rank 0 holds what is not sharded."""

    def train_step(self, shards: list[tuple]) -> dict[str, float]:
        """One optimizer step; rank r gets `shards[r]` = (scored samples, normalizer), the
        samples as a reference it resolves itself."""
        return self.call_each("train_step", shards)[0]

    def evaluate(self, shards: list[tuple]) -> list[dict[str, float]]:
        """Each rank's loss and metric sums over its shard: `shards[r]` = (scored samples,)."""
        return self.call_each("evaluate", shards)

    def save_checkpoint(self, directory: str) -> None:
        self.call("save_checkpoint", directory)

    def load_checkpoint(self, directory: str) -> None:
        self.call("load_checkpoint", directory)

    def save_pretrained(self, path: str, tokenizer_path: str) -> None:
        self.call("save_pretrained", path, tokenizer_path)

    def export_to_dir(self, folder: str, dtype: str) -> int:
        """Rank 0 writes the full weights into `folder`; the bytes written."""
        return sum(self.call("export_to_dir", folder, dtype))

    def weight_specs(self, dtype: str) -> list:
        return self.call("weight_specs", dtype)[0]

    def ipc_weights(self, dtype: str) -> list:
        """Per rank: (bucket entries, CUDA IPC handle) of its full weights on its GPU."""
        return self.call("ipc_weights", dtype)

    def node_address(self) -> tuple[str, int]:
        """An address and a free port on rank 0's node."""
        return self.call_one(0, "node_address")

    def submit_init_weight_group(self, address: str, port: int, world: int) -> Pending:
        return self.submit_each("init_weight_group", [(address, port, world)] * len(self))

    def submit_broadcast_weights(self, dtype: str) -> Pending:
        return self.submit_each("broadcast_weights", [(dtype,)] * len(self))


class TeacherGroup(ActorGroup):
    """One teacher's scorers: `teacher.num_workers` replicas of it (frozen, or following the
    student's weights, every replica receiving the same pushes)."""

    name = "teacher"  # `TeacherConfig.name`

    def submit_score(self, per_replica: list[list]) -> Pending:
        """Replica i scores `per_replica[i]` = [samples, request]."""
        return self.submit_each("score", [tuple(a) for a in per_replica])

    def submit_score_shards(self, parts: list, request, shards: int, ranks: list) -> Pending:
        """Replica i scores the samples of `parts` (references to lists of samples) that
        `ranks[i]` names ({key: learner rank}; None: all, to one replica) and keeps them as
        `shards` references (`pending.refs[i][1:]`); collects (version, metrics, count)."""
        args = [(request, shards, r, *parts) for r in ranks]
        return self.submit_each("score_shards", args, 1 + shards)

    def submit_update(self, folder: str, version: int) -> Pending:
        return self.submit_each("update_from_dir", [(folder, version)] * len(self))

    def update_one(self, i: int, folder: str, version: int) -> float:
        return self.call_one(i, "update_from_dir", folder, version)

    def save_state(self, path: str) -> None:
        """Replica 0's state: every replica holds the same (the same pushes, in order)."""
        self.call_one(0, "save_state", path)

    def load_state(self, path: str) -> None:
        self.call("load_state", path)

    def versions(self) -> list[int]:
        return self.call("ping")

    def signal_report(self, request) -> list[str]:
        return self.call_one(0, "signal_report", request)


class RolloutGroup(ActorGroup):
    """vLLM engines, one per worker."""

    def submit_generate(self, per_worker: list[tuple], **sampling: Any) -> Pending:
        """Worker w generates `per_worker[w]` = (GenerationRequests, the call's batch seed)
        with `sampling` settings. `collect` gathers the samples' metadata; `pending.refs[w][1]`
        stays a reference to worker w's samples."""
        return self.submit_each("generate", per_worker, num_returns=2, **sampling)

    def sleep(self) -> None:
        self.call("sleep")

    def wake_up(self) -> None:
        self.call("wake_up")

    def submit_load_from_dir(self, folder: str, version: int) -> Pending:
        return self.submit_each("load_weights_from_dir", [(folder, version)] * len(self))

    def load_one_from_dir(self, i: int, folder: str, version: int) -> None:
        self.call_one(i, "load_weights_from_dir", folder, version)

    def submit_init_weight_group(self, address: str, port: int, ranks: list[int], world: int):
        """Worker w joins the learner's NCCL group as rank `ranks[w]` of `world`."""
        return self.submit_each("init_weight_group", [(address, port, r, world) for r in ranks])

    def submit_receive_weights(self, specs: list, version: int) -> Pending:
        return self.submit_each("receive_weights", [(specs, version)] * len(self))

    def load_from_ipc(self, shared: list, workers: list[int], version: int) -> None:
        """Worker i copies from learner rank i's CUDA IPC buffer, for each i in `workers`."""
        self.call_on(workers, "load_weights_from_ipc", [(*shared[i], version) for i in workers])
