"""The learner's ZeRO stage chosen by model size (`learner.zero_stage: null`)."""

import pytest

from opd.learner.zero import CPU_STAGE, choose_stage, resolve_stage, state_bytes

GB = 1e9


def test_state_bytes_by_stage_against_hand_counts():
    n, w = 10**9, 4
    # bf16 weights 2 + bf16 grads 2 + fp32 master 4 + moments 8 = 16 bytes a parameter
    assert state_bytes(n, 0, w) == 16 * n
    assert state_bytes(n, 1, w) == 2 * n + 2 * n + 12 * n / w
    assert state_bytes(n, 2, w) == 2 * n + (2 * n + 12 * n) / w
    assert state_bytes(n, 3, w) == 16 * n / w
    # fp32 weights need no master copy: 4 + 4 + 8
    assert state_bytes(n, 0, 1, weight_bytes=4) == 16 * n


@pytest.mark.parametrize(
    "params, world, memory, stage",
    [
        (1.5e9, 1, 141 * GB, 0),  # one rank: nothing to shard
        (70e9, 1, 141 * GB, 0),  # even when it cannot fit: no stage would help
        (1.5e9, 2, 141 * GB, 0),  # 24 GB of states in half of 141 GB
        (5e9, 2, 141 * GB, 1),  # stage 0: 80 GB > 70.5; stage 1: 10 + 10 + 30 = 50 GB
        (7e9, 8, 80 * GB, 1),  # stage 0: 112 GB > 40; stage 1: 14 + 14 + 10.5 = 38.5 GB
        (9e9, 8, 80 * GB, 2),  # stage 1: 49.5 GB > 40; stage 2: 18 + 15.75 = 33.75 GB
        (14e9, 8, 80 * GB, 3),  # stage 2: 52.5 GB > 40; stage 3: 28 GB
        (70e9, 8, 141 * GB, 3),  # stage 3 needs 140 GB > 70.5: none fits, the most sharding
    ],
)
def test_the_lowest_stage_whose_states_fit_in_half_the_memory(params, world, memory, stage):
    assert choose_stage(int(params), world, memory) == stage
    if world > 1:  # every lower stage would not have fit
        assert all(state_bytes(int(params), s, world) > 0.5 * memory for s in range(stage))


def test_a_set_stage_is_kept_and_cpus_keep_stage_2():
    assert resolve_stage(1, 10**9, 4, "cuda", 2, 1.0) == 1
    assert resolve_stage(None, 10**9, 4, "cpu", 4, 0.0) == CPU_STAGE == 2
