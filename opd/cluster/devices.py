"""Which GPUs an actor's process sees.

Ray shows each actor only the GPUs it holds (CUDA_VISIBLE_DEVICES). NCCL between processes of
one host can use its peer-to-peer transports only between GPUs the process can see, so
`show_peer_gpus` keeps the actor's own GPUs first (`cuda:0` is still its own) and appends the
node's other GPUs, as Ray Train does for its torch workers and as the multi-GPU benchmarks
here run. With it, two learner actors formed their NCCL group and trained on the 2xH200
machine (benchmarks/ray_learners.py); Ray's isolated view was not measured against it (the
stall first blamed on it was a placement group that could not be placed, now caught by
`check_gpu_packing`). `OPD_ISOLATE_GPUS=1` keeps Ray's isolation.
"""

from __future__ import annotations

import os


def peer_order(mine: list[str], node: list[str]) -> list[str]:
    """`mine` first, then the rest of `node` in order."""
    return mine + [g for g in node if g not in mine]


def node_gpu_ids(count: int, launched_with: str | None) -> list[str]:
    """The node's GPU ids as Ray names them: `OPD_NODE_GPUS` (the CUDA_VISIBLE_DEVICES Ray
    was started under, which an actor cannot read back) if set, else 0..count-1."""
    if launched_with:
        return [g.strip() for g in launched_with.split(",") if g.strip()]
    return [str(i) for i in range(count)]


def show_peer_gpus() -> list[str] | None:
    """In a Ray actor that holds GPUs, before CUDA is initialized: make the node's other GPUs
    visible after its own. Returns the new order (None outside Ray or without GPUs, or when
    `OPD_ISOLATE_GPUS=1` keeps Ray's isolation)."""
    if os.environ.get("OPD_ISOLATE_GPUS") == "1":
        return None
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    mine = [str(g) for g in ray.get_gpu_ids()]
    if not mine:
        return None
    node_id = ray.get_runtime_context().get_node_id()
    count = next(
        (int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node_id), 0
    )
    node = node_gpu_ids(count, os.environ.get("OPD_NODE_GPUS"))
    if not set(mine) <= set(node):  # Ray started under a restriction we cannot see: keep it
        return None
    order = peer_order(mine, node)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(order)
    return order
