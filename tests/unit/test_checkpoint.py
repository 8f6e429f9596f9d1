"""Checkpoint folders are atomic, pruned to keep_last and verified at resume: a damaged one is
skipped for the newest intact one, naming the damaged file; a full disk is named and cleaned
up; a learner loads only weights and plain state, never code planted in a checkpoint."""

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from opd.learner.checkpoint import (
    CheckpointDir,
    CheckpointError,
    UnsafeCheckpointError,
    rng_state,
    set_rng_state,
)


def _commit(ckpt, step, payload=b"weights"):
    tmp = ckpt.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "model.pt").write_bytes(payload * 100)
    return ckpt.commit(tmp, step, {"step": step})


def test_commit_prune_and_latest(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in (3, 6, 9):
        tmp = ckpt.begin(step)
        (tmp / "weights").write_text(str(step))
        ckpt.commit(tmp, step, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_6", "step_9"]
    path, state = ckpt.latest()
    assert path.name == "step_9" and state == {"step": 9}
    # An interrupted write leaves only a temporary folder; latest still names step 9.
    (ckpt.begin(12) / "weights").write_text("partial")
    assert ckpt.latest()[1]["step"] == 9
    ckpt.clear_partial()
    assert not list(tmp_path.glob(".tmp_step_*"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "trainer_state.json").write_text('{"step": 9, "da'),  # truncated
        lambda d: (d / "learner" / "model.pt").write_bytes(b"weights" * 50),  # truncated
        lambda d: (d / "learner" / "model.pt").unlink(),  # missing
        lambda d: (d / "learner" / "model.pt").write_bytes(b"WEIGHTS" * 100),  # changed
    ],
    ids=["truncated-state", "truncated-model", "missing-model", "changed-model"],
)
def test_damaged_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, damage):
    ckpt = CheckpointDir(tmp_path, keep_last=3)
    for step in (3, 6, 9):
        _commit(ckpt, step)
    damage(tmp_path / "step_9")
    path, state = ckpt.latest()
    assert path.name == "step_6" and state == {"step": 6}
    err = capsys.readouterr().err
    assert "step_9" in err and "damaged" in err and "resuming from" in err


def test_no_intact_checkpoint_is_an_error_naming_the_damaged_files(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    _commit(ckpt, 2)
    _commit(ckpt, 4)
    (tmp_path / "step_2" / "learner" / "model.pt").write_bytes(b"")
    (tmp_path / "step_4" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError) as e:
        ckpt.latest()
    msg = str(e.value)
    assert str(tmp_path / "step_2" / "learner" / "model.pt") in msg
    assert str(tmp_path / "step_4" / "trainer_state.json") in msg
    assert "run.resume=false" in msg


def test_incomplete_folder_named_by_latest_is_an_error(tmp_path):
    (tmp_path / "step_4").mkdir()
    (tmp_path / "latest").write_text("step_4")
    with pytest.raises(CheckpointError, match="step_4"):
        CheckpointDir(tmp_path, 1).latest()


def test_a_lost_pointer_still_resumes(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    _commit(ckpt, 5)
    (tmp_path / "latest").unlink()
    assert ckpt.latest()[1]["step"] == 5


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (needs root, as in CI)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


class _Role:
    """A role group whose checkpoint call writes with `save` (the learner's `save_checkpoint`,
    the teacher's `save_state`)."""

    def __init__(self, save):
        self.save = save

    def _write(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        self.save(Path(path))

    save_checkpoint = save_state = _write


class _Roles:
    """The learner writes `nbytes` through torch.save, as DeepSpeed does; the teacher nothing."""

    def __init__(self, nbytes):
        def save(path):
            # DeepSpeed's format: a full disk fails as `basic_ios::clear: iostream error`
            torch.save(
                torch.zeros(nbytes // 4), path / "states.pt", _use_new_zipfile_serialization=False
            )

        self.learner, self.teacher = _Role(save), _Role(lambda path: None)


def _save(ckpt, nbytes, step):
    from opd.config import load_config
    from opd.loop import save_checkpoint

    cfg = load_config(Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml", [])
    save_checkpoint(ckpt, _Roles(nbytes), cfg, step, {"cursor": step})


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(small_fs):
    ckpt = CheckpointDir(small_fs / "checkpoints", keep_last=1)
    with pytest.raises(CheckpointError, match=r"no space left on device \(ENOSPC\)") as e:
        _save(ckpt, 2 << 20, step=1)
    assert str(small_fs / "checkpoints" / ".tmp_step_1") in str(e.value)
    assert list((small_fs / "checkpoints").iterdir()) == []


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(small_fs):
    ckpt = CheckpointDir(small_fs / "checkpoints", keep_last=1)
    _save(ckpt, 600 << 10, step=1)
    with pytest.raises(CheckpointError, match="ENOSPC") as e:
        _save(ckpt, 600 << 10, step=2)
    assert "step_1" in str(e.value)
    assert sorted(p.name for p in (small_fs / "checkpoints").iterdir()) == ["latest", "step_1"]
    assert ckpt.latest()[1]["step"] == 1


# -- code planted in a checkpoint ----------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    from opd.cluster.placement import free_port
    from opd.config.schema import LearnerConfig, ObjectiveConfig
    from opd.learner.worker import Learner
    from opd.models.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("model")
    build_tokenizer(root / "tok")
    build_model(root / "model", root / "tok")
    cfg = LearnerConfig(zero_stage=2, lr=1e-2, micro_batch_size=2)
    return Learner(
        0, 1, "127.0.0.1", free_port(), str(root / "model"), cfg, ObjectiveConfig(),
        total_steps=10, grad_accum_steps=1, seed=0, device="cpu",
    )  # fmt: skip


def test_learner_checkpoint_round_trips_with_weights_only_loads(learner, tmp_path):
    before = {k: v.clone() for k, v in learner.state_dict_for_export("float32").items()}
    learner.save_checkpoint(str(tmp_path))
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1.0)
    learner.load_checkpoint(str(tmp_path))
    after = learner.state_dict_for_export("float32")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "optim_states.pt"])
def test_resume_refuses_code_planted_in_a_checkpoint(learner, tmp_path, name):
    learner.save_checkpoint(str(tmp_path))
    target = next((tmp_path / "learner").glob(f"*{name}"))
    marker = tmp_path / "marker"
    state = torch.load(target, weights_only=False)
    state["planted"] = _Payload(marker)
    torch.save(state, target, _use_new_zipfile_serialization=False)  # DeepSpeed's format
    with pytest.raises(UnsafeCheckpointError) as e:
        learner.load_checkpoint(str(tmp_path))
    assert str(target) in str(e.value) and "GLOBAL exec" in str(e.value)
    assert not marker.exists(), "the planted code ran"


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=1)
    final = _commit(ckpt, 1)
    files = json.loads((final / "manifest.json").read_text())["files"]
    assert set(files) == {"learner/model.pt", "trainer_state.json"}
    assert files["learner/model.pt"]["size"] == 700
    assert len(files["learner/model.pt"]["sha256"]) == 64
