"""Resource checks name the role and resource that do not fit."""

import pytest

from opd.cluster.placement import check_devices, check_fits, role_bundles
from opd.config.schema import Config, LearnerConfig, RolloutConfig, TeacherConfig


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


def test_colocated_bundles_share_learner_and_rollout_devices():
    from opd.cluster.placement import colocated_bundles
    from opd.config.schema import ClusterConfig

    cfg = Config(
        rollout=RolloutConfig(num_workers=1, num_gpus=0.4, num_cpus=1),
        learner=LearnerConfig(num_workers=2, num_gpus=0.6, num_cpus=2, micro_batch_size=2),
        cluster=ClusterConfig(placement="colocated"),
    )
    # bundle 0: learner rank 0 + rollout worker 0 on one GPU; bundle 1: learner rank 1 alone
    assert colocated_bundles(cfg) == [{"CPU": 3, "GPU": 1.0}, {"CPU": 2, "GPU": 0.6}]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"placement": "colocated", "rollouts": 2, "learners": 1}, "rollout.num_workers=2 exceeds"),
        ({"placement": "colocated", "staleness": 1}, "max_staleness=1 .*rollout.sleep=false"),
        ({"placement": "packed"}, "cluster.placement='packed'; valid: split, colocated"),
        ({"staleness": -1}, "rollout.max_staleness=-1 must be >= 0"),
    ],
)
def test_placement_and_async_settings_are_checked(kw, match):
    from opd.config.schema import ClusterConfig

    with pytest.raises(ValueError, match=match):
        Config(
            rollout=RolloutConfig(
                num_workers=kw.get("rollouts", 1), max_staleness=kw.get("staleness", 0)
            ),
            learner=LearnerConfig(num_workers=kw.get("learners", 1)),
            cluster=ClusterConfig(placement=kw.get("placement", "split")),
        )


def test_colocated_async_rollouts_need_vllm_awake():
    from opd.config.schema import ClusterConfig

    cfg = Config(
        rollout=RolloutConfig(max_staleness=1, sleep=False),
        cluster=ClusterConfig(placement="colocated"),
    )
    assert cfg.rollout.max_staleness == 1 and not cfg.rollout.sleep


def _colocated(teacher_gpus, learners=2):
    from opd.config.schema import ClusterConfig

    return Config(
        rollout=RolloutConfig(num_workers=learners, num_gpus=0.4),
        learner=LearnerConfig(num_workers=learners, num_gpus=0.5),
        teacher=TeacherConfig(num_gpus=teacher_gpus),
        cluster=ClusterConfig(placement="colocated"),
    )


def test_gpu_shares_must_pack_into_whole_gpus():
    from opd.cluster.placement import check_gpu_packing

    # 0.9 + 0.9 + 0.2 = 2 GPUs in total, but 0.2 fits beside 0.9 on neither GPU
    check_fits(_colocated(0.2), {"CPU": 8, "GPU": 2})
    with pytest.raises(ValueError, match=r"teacher share 0.2 fits beside the others on no GPU"):
        check_gpu_packing(_colocated(0.2), 2)
    check_gpu_packing(_colocated(0.1), 2)
    check_gpu_packing(_colocated(0.1, learners=1), 1)
    # whole GPUs are taken first, then the fractions pack into what is left
    split = Config(
        rollout=RolloutConfig(num_workers=1, num_gpus=0.6),
        learner=LearnerConfig(num_workers=2, num_gpus=1),
        teacher=TeacherConfig(num_gpus=0.4),
    )
    check_gpu_packing(split, 3)
    with pytest.raises(ValueError, match="do not pack into 2 GPU"):
        check_gpu_packing(split, 2)
