"""Which teacher scores which prompt, and which replica of it scores which samples.

- `Router`: with several teachers (`teachers:`), a prompt goes to the teacher whose `route`
  lists its `data.route_field` value, else to the one teacher without a route; a value no
  teacher takes is an error naming the prompt and its source.
- `split_by_tokens`: a teacher's samples spread over its replicas (`teacher.num_workers`) by
  token count, a prompt's samples kept on one replica (its group's reward and anchor are
  centered there).
- `merge_metrics`: the reward and anchor metrics of several scorers, as one scorer would have
  reported them over the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from opd.config.schema import Config
from opd.samples import SampleMeta


class Router:
    def __init__(self, cfg: Config) -> None:
        teachers = cfg.all_teachers
        self.field = cfg.data.route_field
        self.names = [t.name for t in teachers]
        self.table = {value: i for i, t in enumerate(teachers) for value in t.route}
        rest = [i for i, t in enumerate(teachers) if not t.route]
        self.default = rest[0] if rest else None

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    def teacher_of(self, row: dict, where: str) -> int:
        """The index (in `Config.all_teachers`) of the teacher for data row `row`."""
        if not self.several:
            return 0
        value = row.get(self.field)
        i = self.table.get(str(value)) if value is not None else None
        if i is None:
            i = self.default
        if i is None:
            routes = ", ".join(
                f"{n}: {sorted(k for k, v in self.table.items() if v == j)}"
                for j, n in enumerate(self.names)
            )
            raise ValueError(
                f"{where}: data.route_field {self.field!r} = {value!r} matches no teacher's "
                f"route ({routes}) and every teacher has a route"
            )
        return i


def split_by_tokens(metas: Sequence[SampleMeta], replicas: int) -> list[list[int]]:
    """Positions (into `metas`) for each of `replicas` scorers: whole prompts, the longest
    first, each to the replica with the fewest tokens so far (ties: the lowest index), so the
    split depends only on the batch."""
    groups: dict[int, list[int]] = {}
    for pos, m in enumerate(metas):
        groups.setdefault(m.prompt_index, []).append(pos)
    load = [0] * replicas
    out: list[list[int]] = [[] for _ in range(replicas)]
    cost = {
        p: sum(metas[i].n_tokens + metas[i].prompt_tokens for i in ps) for p, ps in groups.items()
    }
    for p in sorted(groups, key=lambda p: (-cost[p], p)):
        r = min(range(replicas), key=lambda r: (load[r], r))
        out[r].extend(groups[p])
        load[r] += cost[p]
    return [sorted(x) for x in out]


# reward and anchor metrics (opd.rewards.runner, opd.objectives.advantages, opd.anchor.step):
# counts add up; the rest are means over what their weight key counts
SUMMED = {
    "reward/count",
    "reward/timeouts",
    "reward/errors",
    "reward/groups",
    "reward/all_equal_groups",
    "reward/singleton_groups",
}
WEIGHT_OF = {"reward/group_std": "reward/groups"}


def merge_metrics(parts: Sequence[tuple[dict[str, float], int]]) -> dict[str, float]:
    """`parts`: each scorer's metrics and how many samples it scored."""
    parts = [(m, n) for m, n in parts if m]
    if len(parts) <= 1:
        return dict(parts[0][0]) if parts else {}
    out: dict[str, float] = {}
    for key in {k for m, _ in parts for k in m}:
        have = [(m, n) for m, n in parts if key in m]
        if key in SUMMED:
            out[key] = sum(m[key] for m, _ in have)
            continue
        if key in WEIGHT_OF:
            weights = [m.get(WEIGHT_OF[key], 0.0) for m, _ in have]
        elif key.startswith("reward/"):
            weights = [m.get("reward/count", 0.0) for m, _ in have]
        else:
            weights = [float(n) for _, n in have]
        total = sum(weights)
        out[key] = sum(w * m[key] for w, (m, _) in zip(weights, have)) / total if total else 0.0
    return out
