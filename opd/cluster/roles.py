"""Start the three roles of a run as Ray actor groups."""

from __future__ import annotations

from dataclasses import dataclass

from ray.util import remove_placement_group

from opd.cluster.group import ActorGroup
from opd.cluster.placement import colocated_bundles, reserve, role_bundles, spawn
from opd.cluster.role_groups import LearnerGroup, RolloutGroup, TeacherGroup
from opd.config.schema import Config


@dataclass
class Roles:
    rollout: RolloutGroup
    teacher: TeacherGroup
    learner: LearnerGroup

    def shutdown(self) -> None:
        for group in (self.rollout, self.teacher, self.learner):  # learners last: see above
            group.kill()


def start_roles(
    cfg: Config,
    student_path: str,
    teacher_path: str,
    device: str,
    rollout_topk: int = 0,
    anchor_use: str | None = None,
) -> Roles:
    """`rollout_topk`: how many top log-probs per token the objective asks of the rollout;
    `anchor_use`: how the objective takes the discriminator anchor (`Objective.anchor_use`).

    The three roles load their models at the same time. On GPUs the vLLM engine starts last:
    it sizes its KV cache from the memory it finds free, so the others must hold theirs first.
    """
    from opd.learner.worker import Learner
    from opd.rollout.worker import RolloutWorker
    from opd.teacher.scorer import TeacherScorer

    bundles = role_bundles(cfg)
    timeout = cfg.cluster.timeout_s
    world = cfg.learner.num_workers
    restarts = cfg.cluster.max_restarts
    shared = None
    if cfg.cluster.placement == "colocated":
        shared = reserve("learner+rollout (colocated)", colocated_bundles(cfg), timeout)
    started: list[ActorGroup] = []

    def wait_for_all() -> None:
        for group in started:
            group.call("ping")  # constructor errors surface here, named by role

    try:
        learner = spawn(
            "learner",
            Learner,
            bundles["learner"],
            lambda i, master: (
                (
                    i,
                    world,
                    master[0],
                    master[1],
                    student_path,
                    cfg.learner,
                    cfg.objective,
                    cfg.trainer.steps,
                    cfg.grad_accum_steps,
                    cfg.run.seed,
                    device,
                ),
                {"teacher": cfg.teacher, "teacher_path": teacher_path},
            ),
            timeout,
            pg=shared,
            wait=False,
            group_cls=LearnerGroup,
        )
        if shared is not None:
            learner.placement_group = shared  # the learners own it: killed last, it goes with them
        started.append(learner)
        teacher = spawn(
            "teacher",
            TeacherScorer,
            bundles["teacher"],
            lambda i, _: (
                (cfg.teacher, teacher_path, device, student_path),
                {
                    "rewards": cfg.rewards if cfg.rewards.enabled else None,
                    "anchor": (cfg.anchor, anchor_use) if cfg.anchor.enabled else None,
                },
            ),
            timeout,
            # an EMA teacher's state lives in the actor: a restart would silently reset it
            max_restarts=restarts if cfg.teacher.mode != "ema" else 0,
            wait=False,
            group_cls=TeacherGroup,
        )
        started.append(teacher)
        if device == "cuda":
            wait_for_all()
        rollout = spawn(
            "rollout",
            RolloutWorker,
            bundles["rollout"],
            lambda i, _: (
                (student_path, cfg.rollout, cfg.run.seed, device, cfg.student.gguf_file),
                {
                    "compilation_config": cfg.rollout.compilation_config,
                    "max_logprobs": rollout_topk,
                    "agent": cfg.agent if cfg.agent.enabled else None,
                },
            ),
            timeout,
            max_restarts=restarts,
            pg=shared,
            wait=False,
            group_cls=RolloutGroup,
        )
        started.append(rollout)
        wait_for_all()
    except BaseException:
        for group in reversed(started):  # learners last, with the placement group they own
            group.kill()
        if shared is not None and not started:
            remove_placement_group(shared)
        raise
    return Roles(rollout=rollout, teacher=teacher, learner=learner)
