"""The driver's side of scoring: a step's samples spread over the teachers and their replicas.

Each sample goes to its teacher (`Sample.teacher_index`, from `data.route_field`), and within
that teacher to one replica (`split_by_tokens`: whole prompts, balanced by tokens). Every
scorer keeps its samples as one reference per learner rank, so rank r receives a few
references (one per scorer) and merges them in batch order: the same samples, in the same
order, with the same scores as from a single scorer. A scorer that died is restarted by Ray
and given its part again (`restore` re-sends a following teacher's weights).
"""

from __future__ import annotations

from collections.abc import Callable

from opd.cluster.group import RoleError
from opd.cluster.role_groups import TeacherGroup
from opd.samples import Sample, SampleBatch
from opd.signals import TeacherRequest
from opd.teacher.routing import merge_metrics, split_by_tokens

Restore = Callable[[TeacherGroup, int], None]


def _positions_by_teacher(metas: list) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for pos, m in enumerate(metas):
        out.setdefault(m.teacher_index, []).append(pos)
    return out


def score_for_learners(
    teachers: list[TeacherGroup],
    restore: Restore,
    batch: SampleBatch,
    request: TeacherRequest,
    n_learners: int,
) -> tuple[list[list], int, dict[str, float]]:
    """The batch scored as `request` asks (and rewarded, where samples carry a record), kept
    where the scorers are: per learner rank r, the references to its samples (those at batch
    positions p with p % n_learners == r); the first teacher's version; the reward and anchor
    metrics, and with several teachers each one's share (`teacher/<name>/samples`)."""
    jobs = []
    for t, positions in sorted(_positions_by_teacher(batch.metas).items()):
        group = teachers[t]
        if len(teachers) == 1 and len(group) == 1:
            ranks = [None]  # every sample, shard r = samples[r::n]
        else:
            metas = [batch.metas[p] for p in positions]
            ranks = [
                {metas[i].key: positions[i] % n_learners for i in part}
                for part in split_by_tokens(metas, len(group))
            ]
        jobs.append((t, group, group.submit_score_shards(batch.parts, request, n_learners, ranks)))
    versions: dict[int, list[int]] = {}
    parts: list[tuple[dict, int]] = []
    metrics: dict[str, float] = {}
    for t, group, pending in jobs:
        for i in range(len(pending.refs)):
            version, m, n = group.collect_one(pending, i, lambda i, g=group: restore(g, i))
            versions.setdefault(t, []).append(version)
            parts.append((m, n))
            if len(teachers) > 1:
                key = f"teacher/{group.name}/samples"
                metrics[key] = metrics.get(key, 0.0) + n
    for t, vs in versions.items():
        check_versions(teachers[t], vs)
    shards = [
        [p.refs[i][1 + r] for _, _, p in jobs for i in range(len(p.refs))]
        for r in range(n_learners)
    ]
    # the first teacher's version; asked of it only on a step that gave it no sample
    version = versions[0][0] if 0 in versions else teachers[0].versions()[0]
    return shards, version, {**merge_metrics(parts), **metrics}


def score(
    teachers: list[TeacherGroup], restore: Restore, samples: list[Sample], request: TeacherRequest
) -> list[Sample]:
    """`samples` (held by the driver) with their teachers' scores, in their order."""
    metas = [s.meta() for s in samples]
    jobs = []
    for t, positions in sorted(_positions_by_teacher(metas).items()):
        group = teachers[t]
        split = split_by_tokens([metas[p] for p in positions], len(group))
        per_replica = [[positions[i] for i in part] for part in split]
        args = [[[samples[p] for p in ps], request] for ps in per_replica]
        jobs.append((group, per_replica, group.submit_score(args)))
    out: list[Sample | None] = [None] * len(samples)
    for group, per_replica, pending in jobs:
        for i, ps in enumerate(per_replica):
            scored = group.collect_one(pending, i, lambda i, g=group: restore(g, i))
            for p, s in zip(ps, scored, strict=True):
                out[p] = s
    return out


def check_versions(group: TeacherGroup, versions: list[int]) -> None:
    """Every replica of a teacher scores with the same weights (they get the same pushes)."""
    if len(set(versions)) > 1:
        raise RoleError(
            f"{group.role}: replicas scored with different weight versions {versions}; "
            "each replica must receive every push"
        )
