"""Resource checks name the role and resource that do not fit."""

import pytest

from opd.cluster.placement import check_devices, check_fits, role_bundles
from opd.config.schema import Config, LearnerConfig, RolloutConfig


def _cfg(**kw):
    return Config(
        rollout=RolloutConfig(num_workers=2, num_gpus=kw.get("rollout_gpus", 0)),
        learner=LearnerConfig(num_workers=2, num_gpus=kw.get("learner_gpus", 0)),
    )


def test_bundles_per_role():
    b = role_bundles(_cfg(rollout_gpus=1, learner_gpus=1))
    assert b["rollout"] == [{"CPU": 0.5, "GPU": 1}] * 2
    assert b["teacher"] == [{"CPU": 0.5}]
    assert len(b["learner"]) == 2


def test_check_fits_names_roles_and_resource():
    cfg = _cfg(rollout_gpus=1, learner_gpus=1)
    check_fits(cfg, {"CPU": 8, "GPU": 4})
    with pytest.raises(
        ValueError,
        match=r"needs 4 GPU \(rollout 2, learner 2\) but the cluster "
        r"has 3",
    ):
        check_fits(cfg, {"CPU": 8, "GPU": 3})


def test_gpu_device_needs_gpu_shares():
    with pytest.raises(ValueError, match="rollout.num_gpus, teacher.num_gpus, learner.num_gpus"):
        check_devices(_cfg(), "cuda")
    check_devices(_cfg(), "cpu")
