"""The learner's ZeRO stage when the recipe leaves it to opd (`learner.zero_stage: null`).

Each rank holds its model states: bf16 (or fp32) weights and gradients, and AdamW's fp32
master weights and two moments (12 bytes a parameter in mixed precision). ZeRO shards them
over the data-parallel ranks, at the price of extra collectives every step: stage 1 the
optimizer states, stage 2 the gradients too, stage 3 the weights too. A stage only helps when
the states would not fit otherwise, and with one rank no stage shards anything. So: the
lowest stage whose per-rank states fit in `STATES_SHARE` of the memory the rank may use (the
rest is for activations, the LM head's logits and, colocated, what shares the device).

On CPUs the choice is stage 2, what the CPU recipes and tests have always run.
"""

from __future__ import annotations

STATES_SHARE = 0.5  # of the rank's memory, for weights, gradients and optimizer states
CPU_STAGE = 2


def state_bytes(n_params: int, stage: int, world: int, weight_bytes: int = 2) -> float:
    """Per-rank bytes of weights, gradients (both `weight_bytes` each) and fp32 optimizer
    states (master weights where the weights are not fp32, and two moments) at ZeRO `stage`
    over `world` ranks."""
    optimizer = (4 if weight_bytes != 4 else 0) + 8
    weights, grads, states = weight_bytes * n_params, weight_bytes * n_params, optimizer * n_params
    if stage >= 1:
        states /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    return weights + grads + states


def choose_stage(n_params: int, world: int, rank_memory: float, weight_bytes: int = 2) -> int:
    """The lowest ZeRO stage whose states fit in `STATES_SHARE` of `rank_memory` bytes; stage 0
    for one rank (nothing to shard), stage 3 when none fits (the most it can shard)."""
    if world == 1:
        return 0
    budget = STATES_SHARE * rank_memory
    for stage in (0, 1, 2, 3):
        if state_bytes(n_params, stage, world, weight_bytes) <= budget:
            return stage
    return 3


def resolve_stage(
    configured: int | None,
    n_params: int,
    world: int,
    device: str,
    weight_bytes: int,
    gpu_share: float,
) -> int:
    """`learner.zero_stage` as set, or chosen (`choose_stage`) from the GPU's memory times the
    rank's share of it (`learner.num_gpus`, 1 for a whole GPU); on CPUs `CPU_STAGE`."""
    if configured is not None:
        return configured
    if device != "cuda":
        return CPU_STAGE
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    share = gpu_share if 0 < gpu_share < 1 else 1.0
    return choose_stage(n_params, world, total * share, weight_bytes)
