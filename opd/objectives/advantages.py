"""Group-normalized advantages from one outcome reward per sample: GRPO's baseline without a
value model (docs/objectives.md#group-advantages).

The samples that share a group id (the `rollout.samples_per_prompt` completions of one prompt)
form a group g. With r_i the reward of sample i, mean_g and std_g the mean and the population
standard deviation (divided by the group size G, not G - 1) of its group's rewards:

- `scale="std"` (GRPO): A_i = (r_i - mean_g) / (std_g + eps);
- `scale="none"` (Dr. GRPO): A_i = r_i - mean_g.

A group whose rewards are all equal, a group of one sample included, carries no signal: its
advantages are exactly 0 (not 0 / eps), and it is counted in `all_equal_groups`.

The population std is our choice. TRL's GRPOTrainer and verl's GRPO estimator call
`torch.std`, whose default is the unbiased (G - 1) form, so their advantages are
sqrt((G - 1) / G) times ours, up to eps (0.71 at G = 2, 0.94 at G = 8). With the population
std, a group's advantages have mean 0 and, away from eps, variance exactly 1; a two-sample
group with rewards {0, 1} gets -1 and +1.

Plain Python floats in sample order: the result does not depend on how groups interleave
and is the same on every run. The learner hands them to the loss as `LossInputs.advantages_B`;
`token_advantages` is how a loss reads them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from opd.objectives.base import LossInputs

SCALES = ("std", "none")


@dataclass
class GroupStats:
    groups: int
    all_equal_groups: int  # every reward equal (singletons included): advantage 0
    singleton_groups: int  # groups of one sample
    mean_std: float  # mean over groups of the population std of their rewards

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """`{prefix}/groups`, `{prefix}/all_equal_groups`, `{prefix}/singleton_groups`,
        `{prefix}/group_std`."""
        return {
            f"{prefix}/groups": float(self.groups),
            f"{prefix}/all_equal_groups": float(self.all_equal_groups),
            f"{prefix}/singleton_groups": float(self.singleton_groups),
            f"{prefix}/group_std": self.mean_std,
        }


def group_members(group_ids: Sequence[Hashable]) -> list[list[int]]:
    """The sample indices of each group, groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    return list(members.values())


def group_advantages(
    rewards: Sequence[float],
    group_ids: Sequence[Hashable],
    *,
    scale: str = "std",
    eps: float = 1e-6,
) -> tuple[list[float], GroupStats]:
    """One advantage per sample, in input order, and the groups' stats (module docstring)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; valid: {', '.join(SCALES)}")
    if not eps >= 0:
        raise ValueError(f"eps={eps} must be >= 0")
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    values = [float(r) for r in rewards]
    bad = [i for i, r in enumerate(values) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"rewards must be finite; sample {bad[0]} has {values[bad[0]]}")

    advantages = [0.0] * len(values)
    groups = group_members(group_ids)
    all_equal = singletons = 0
    stds = []
    for idx in groups:
        rs = [values[i] for i in idx]
        singletons += len(idx) == 1
        if max(rs) == min(rs):
            all_equal += 1
            stds.append(0.0)
            continue
        mean = math.fsum(rs) / len(rs)
        std = math.sqrt(math.fsum((r - mean) ** 2 for r in rs) / len(rs))
        stds.append(std)
        for i, r in zip(idx, rs):
            advantages[i] = (r - mean) / (std + eps) if scale == "std" else r - mean
    stats = GroupStats(
        groups=len(groups),
        all_equal_groups=all_equal,
        singleton_groups=singletons,
        mean_std=math.fsum(stds) / len(stds) if stds else 0.0,
    )
    return advantages, stats


def token_advantages(x: LossInputs, objective: str) -> Tensor:
    """`x.advantages_B` broadcast over each sequence's completion tokens, [B, T], 0 where the
    mask is 0, in the log-probs' precision (fp32 at least); an error naming the recipe keys if
    the learner was given no advantages."""
    if x.advantages_B is None:
        raise ValueError(
            f"objective {objective} needs rewards: set rewards.name or rewards.import_path "
            "(this micro-batch has no advantages_B)"
        )
    dtype = torch.promote_types(x.logprobs_BT.dtype, torch.float32)
    return x.advantages_B.to(dtype)[:, None] * x.mask_BT.to(dtype)


def with_anchor(adv_BT: Tensor, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """`adv_BT` with the discriminator anchor's term (`anchor:`) added to every counted token,
    and token sums of both parts' sizes (the learner reports the anchor's share)."""
    if x.anchor_B is None:
        return adv_BT, {}
    mask = x.mask_BT.to(adv_BT.dtype)
    term_BT = x.anchor_B.to(adv_BT.dtype)[:, None] * mask
    return adv_BT + term_BT, {
        "anchor/abs_advantage": term_BT.abs().sum().detach(),
        "anchor/abs_base_advantage": (adv_BT * mask).abs().sum().detach(),
    }
