"""Checkpoint folders are atomic, pruned to keep_last, and `latest` names a complete one."""

import random

import pytest
import torch

from opd.learner.checkpoint import CheckpointDir, rng_state, set_rng_state


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


def test_latest_pointing_at_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "step_4").mkdir()
    (tmp_path / "latest").write_text("step_4")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CheckpointDir(tmp_path, 1).latest()


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
