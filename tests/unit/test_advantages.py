"""Group advantages against a brute-force loop: GRPO, Dr. GRPO, all-equal and singleton groups."""

import random

import pytest
import torch

from opd.objectives.advantages import group_advantages


def _brute_force(rewards, group_ids, scale, eps):
    """For each sample, scan the whole batch for its group (torch's biased std)."""
    out = []
    for i, r in enumerate(rewards):
        group = torch.tensor(
            [rewards[j] for j in range(len(rewards)) if group_ids[j] == group_ids[i]],
            dtype=torch.float64,
        )
        if bool((group == group[0]).all()):
            out.append(0.0)
            continue
        centred = r - group.mean().item()
        std = group.std(unbiased=False).item()
        out.append(centred / (std + eps) if scale == "std" else centred)
    return out


@pytest.mark.parametrize("scale", ["std", "none"])
def test_matches_brute_force_on_interleaved_groups(scale):
    rng = random.Random(0)
    group_ids = [rng.choice("abcdefg") for _ in range(60)]
    rewards = [
        rng.choice([0.0, 0.5, 1.0]) if rng.random() < 0.7 else rng.gauss(0, 2) for _ in group_ids
    ]
    rewards[group_ids.index("a")] = 3.0  # at least one group is not all equal
    adv, stats = group_advantages(rewards, group_ids, scale=scale, eps=1e-3)
    want = _brute_force(rewards, group_ids, scale, 1e-3)
    assert adv == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert stats.groups == len(set(group_ids))
    assert adv == group_advantages(rewards, group_ids, scale=scale, eps=1e-3)[0]  # deterministic


def test_all_equal_and_singleton_groups_give_exactly_zero():
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.3, 0.0, 1.0, 7.0]
    groups = ["same1", "same1", "same1", "same0", "same0", "solo", "mix", "mix", "solo2"]
    adv, stats = group_advantages(rewards, groups)
    assert adv[:6] == [0.0] * 6 and adv[8] == 0.0
    assert adv[6] == pytest.approx(-1.0, rel=1e-5) and adv[7] == pytest.approx(1.0, rel=1e-5)
    assert (stats.groups, stats.all_equal_groups, stats.singleton_groups) == (5, 4, 2)
    assert stats.mean_std == pytest.approx(0.5 / 5)
    m = stats.metrics()
    assert m["reward/all_equal_groups"] == 4.0 and m["reward/group_std"] == pytest.approx(0.1)


def test_population_std_and_eps():
    """G = 4 rewards {0, 0, 0, 1}: mean 1/4, population std sqrt(3)/4."""
    adv, _ = group_advantages([0, 0, 0, 1], [7] * 4, eps=0.0)
    std = 3**0.5 / 4
    assert adv == pytest.approx([-0.25 / std] * 3 + [0.75 / std], rel=1e-12)
    a = torch.tensor(adv, dtype=torch.float64)
    assert a.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert a.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-12)
    dr, _ = group_advantages([0, 0, 0, 1], [7] * 4, scale="none")
    assert dr == [-0.25, -0.25, -0.25, 0.75]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="scale='z'; valid: std, none"):
        group_advantages([1.0], [0], scale="z")
    with pytest.raises(ValueError, match="2 rewards but 1 group ids"):
        group_advantages([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="sample 1 has nan"):
        group_advantages([1.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="eps"):
        group_advantages([1.0], [0], eps=-1.0)
    adv, stats = group_advantages([], [])
    assert adv == [] and stats.groups == 0 and stats.mean_std == 0.0
