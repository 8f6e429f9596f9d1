"""Where the roles run: placement groups, checked against the cluster first.

Split placement (`cluster.placement: split`): rollout workers, the teacher and the learners
each get their own placement group, one bundle per actor (`<role>.num_gpus` / `num_cpus`).
Colocated placement: learner rank i and rollout worker i share bundle i of one group, whose
size is the sum of their shares (e.g. 0.5 + 0.5 GPU = the same GPU); the teacher keeps its own.
A recipe that asks for more than the cluster has fails before any actor starts, naming the
role and the resource.
"""

from __future__ import annotations

import math
import socket

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd.cluster.group import ActorGroup, RoleError
from opd.config.schema import Config


def _bundles(n: int, cpus: float, gpus: float) -> list[dict[str, float]]:
    b = {"CPU": cpus}
    if gpus:
        b["GPU"] = gpus
    return [dict(b) for _ in range(n)]


def teacher_bundles(cfg: Config) -> list[list[dict[str, float]]]:
    """Per teacher (`Config.all_teachers`), one bundle per replica."""
    return [_bundles(t.num_workers, t.num_cpus, t.num_gpus) for t in cfg.all_teachers]


def role_bundles(cfg: Config) -> dict[str, list[dict[str, float]]]:
    return {
        "rollout": _bundles(cfg.rollout.num_workers, cfg.rollout.num_cpus, cfg.rollout.num_gpus),
        "teacher": [b for bundles in teacher_bundles(cfg) for b in bundles],
        "learner": _bundles(cfg.learner.num_workers, cfg.learner.num_cpus, cfg.learner.num_gpus),
    }


def check_devices(cfg: Config, device: str) -> None:
    """On GPUs every role needs a GPU share; name the keys that give it none. The GPU-only
    weight transports need CUDA."""
    if device != "cuda":
        for i, t in enumerate(cfg.all_teachers):
            if t.tensor_parallel_size > 1:
                key = "teacher" if i == 0 else f"teachers[{i - 1}]"
                raise ValueError(
                    f"{key}.tensor_parallel_size={t.tensor_parallel_size} spreads a teacher "
                    f"over GPUs but run.device resolves to {device}: use 1"
                )
        if cfg.rollout.weight_sync in ("nccl", "ipc"):
            raise ValueError(
                f"rollout.weight_sync={cfg.rollout.weight_sync} needs GPUs but run.device "
                f"resolves to {device}: use dir (or auto)"
            )
        return
    missing = ["rollout.num_gpus"] if not cfg.rollout.num_gpus else []
    missing += [
        "teacher.num_gpus" if i == 0 else f"teachers[{i - 1}].num_gpus"
        for i, t in enumerate(cfg.all_teachers)
        if not t.num_gpus
    ]
    missing += ["learner.num_gpus"] if not cfg.learner.num_gpus else []
    if missing:
        raise ValueError(
            f"run.device resolves to cuda but {', '.join(missing)} = 0: set a GPU "
            "share per actor (e.g. 1), or run.device=cpu"
        )


def check_fits(cfg: Config, available: dict[str, float]) -> None:
    """Raise naming what does not fit; `available` is e.g. ray.cluster_resources()."""
    need: dict[str, float] = {}
    per_role: dict[str, dict[str, float]] = {}
    for role, bundles in role_bundles(cfg).items():
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
                per_role.setdefault(role, {})[k] = per_role.get(role, {}).get(k, 0) + v
    for resource, amount in need.items():
        have = available.get(resource, 0)
        if amount > have + 1e-9:
            parts = ", ".join(
                f"{role} {r[resource]:g}" for role, r in per_role.items() if r.get(resource)
            )
            raise ValueError(
                f"the recipe needs {amount:g} {resource} ({parts}) but the cluster "
                f"has {have:g}: lower <role>.num_{resource.lower()}s or num_workers"
            )


def check_local_resources(cfg: Config) -> list[str]:
    """What `opd train` checks once Ray is up, checked before anything starts where the run will
    start its own Ray on this machine (no `cluster.address`, no RAY_ADDRESS): the devices, the
    CPU and GPU totals, the GPU shares' packing. Raises ValueError naming the key; a note."""
    import os

    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        where = cfg.cluster.address or os.environ["RAY_ADDRESS"]
        return [f"resources: checked when the run joins the Ray cluster at {where}"]
    import torch

    gpus = torch.cuda.device_count()
    wanted = sum(b.get("GPU", 0) for bundles in role_bundles(cfg).values() for b in bundles)
    if wanted and not gpus:  # e.g. prepared on a login node for a GPU machine
        return [
            f"resources: the recipe asks for {wanted:g} GPUs and this machine has none; "
            "they are checked when the run starts"
        ]
    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if gpus else "cpu")
    check_devices(cfg, device)
    cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    check_fits(cfg, {"CPU": float(cpus), "GPU": float(gpus)})
    check_gpu_packing(cfg, gpus)
    return [f"resources: fit this machine ({cpus} CPUs for Ray, {gpus} GPUs, device {device})"]


def gpu_shares(cfg: Config) -> list[tuple[str, float]]:
    """Each actor bundle's GPU share, named by what it holds (colocated: learner + rollout)."""
    if cfg.cluster.placement == "colocated":
        shared = [("learner+rollout", b.get("GPU", 0)) for b in colocated_bundles(cfg)]
        extra = max(0, cfg.rollout.num_workers - cfg.learner.num_workers)
        shared += [("rollout", cfg.rollout.num_gpus)] * extra
    else:
        shared = [("learner", cfg.learner.num_gpus)] * cfg.learner.num_workers
        shared += [("rollout", cfg.rollout.num_gpus)] * cfg.rollout.num_workers
    several = len(cfg.all_teachers) > 1
    teachers = [
        (f"teacher {t.name}" if several else "teacher", t.num_gpus)
        for t in cfg.all_teachers
        for _ in range(t.num_workers)
    ]
    return [(n, g) for n, g in shared + teachers if g]


def check_gpu_packing(cfg: Config, n_gpus: int) -> None:
    """Ray puts a bundle's fractional GPU share on one GPU: the shares must pack into
    `n_gpus` whole GPUs, or the last role's placement group waits for its whole timeout
    (seen on 2 GPUs with learner+rollout 0.9 twice and a 0.2 teacher). First-fit decreasing;
    a share of 1 or more takes whole GPUs."""
    shares = gpu_shares(cfg)
    free = float(n_gpus) - sum(math.ceil(g - 1e-9) for _, g in shares if g >= 1)
    bins: list[float] = [1.0] * max(0, int(free + 1e-9))
    for name, g in sorted((x for x in shares if x[1] < 1), key=lambda x: -x[1]):
        slot = next((i for i, room in enumerate(bins) if room >= g - 1e-9), None)
        if slot is None:
            listed = ", ".join(f"{n} {v:g}" for n, v in shares)
            raise ValueError(
                f"the GPU shares do not pack into {n_gpus} GPU(s): {listed}; the {name} "
                f"share {g:g} fits beside the others on no GPU (one actor's share stays on "
                "one GPU): lower <role>.num_gpus so that each GPU's shares sum to 1 or less"
            )
        bins[slot] -= g


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _address_and_port() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port()


def colocated_bundles(cfg: Config) -> list[dict[str, float]]:
    """Bundle i holds learner rank i and, for i < rollout.num_workers, rollout worker i."""
    out = []
    for i in range(cfg.learner.num_workers):
        shares = [cfg.learner] + ([cfg.rollout] if i < cfg.rollout.num_workers else [])
        b = {"CPU": sum(r.num_cpus for r in shares)}
        gpus = sum(r.num_gpus for r in shares)
        if gpus:
            b["GPU"] = gpus
        out.append(b)
    return out


def reserve(role: str, bundles: list[dict[str, float]], timeout_s: float):
    """A ready placement group for `bundles`, or a RoleError naming `role`."""
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        ray.util.remove_placement_group(pg)
        raise RoleError(
            f"{role}: no resources for {bundles} within {timeout_s:.0f} s "
            f"(available: {ray.available_resources()})"
        ) from e
    return pg


def spawn(
    role: str,
    cls,
    bundles: list[dict[str, float]],
    args_for,
    timeout_s: float,
    max_restarts: int = 0,
    pg=None,
    wait: bool = True,
    group_cls: type[ActorGroup] = ActorGroup,
) -> ActorGroup:
    """Start one actor per bundle (actor i asks for `bundles[i]`, in bundle i of `pg`).

    Without `pg`, a fresh placement group of `bundles` is reserved and owned by the group
    (removed when it is killed). `args_for(i, master)` gives actor i's (args, kwargs);
    `master` is an (address, port) on the node of bundle 0, for roles that form a process group
    (the learners). With `wait=False` the constructors run on while the caller goes on: call
    `group.call("ping")` before using the group.
    """
    owned = pg is None
    if owned:
        pg = reserve(role, bundles, timeout_s)
    master = ray.get(
        _address_and_port.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0
            )
        ).remote(),
        timeout=timeout_s,
    )
    remote_cls = ray.remote(cls)
    handles = []
    for i, b in enumerate(bundles):
        args, kwargs = args_for(i, master)
        handles.append(
            remote_cls.options(
                num_cpus=b.get("CPU", 0),
                num_gpus=b.get("GPU", 0),
                max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i
                ),
            ).remote(*args, **kwargs)
        )
    group = group_cls(
        role, handles, timeout_s, placement_group=pg if owned else None, max_restarts=max_restarts
    )
    if wait:
        group.call("ping")  # surface constructor errors here, named by role
    return group
