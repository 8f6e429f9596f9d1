"""Start the three roles of a run as Ray actor groups."""

from __future__ import annotations

from dataclasses import dataclass

from ray.util import remove_placement_group

from opd.cluster.group import ActorGroup
from opd.cluster.placement import (
    colocated_bundles,
    reserve,
    role_bundles,
    spawn,
    teacher_bundles,
)
from opd.cluster.role_groups import LearnerGroup, RolloutGroup, TeacherGroup
from opd.config.schema import Config


@dataclass
class Roles:
    rollout: RolloutGroup
    teachers: list[TeacherGroup]  # `Config.all_teachers`, each with its replicas
    learner: LearnerGroup

    @property
    def teacher(self) -> TeacherGroup:
        """The first teacher: the only one that may follow the student, and keep state."""
        return self.teachers[0]

    def shutdown(self) -> None:
        for group in (self.rollout, *self.teachers, self.learner):  # learners last: see above
            group.kill()


def start_roles(
    cfg: Config,
    student_path: str,
    teacher_paths: list[str],
    device: str,
    rollout_topk: int = 0,
    anchor_use: str | None = None,
) -> Roles:
    """`teacher_paths`: the resolved model of each teacher (`Config.all_teachers`);
    `rollout_topk`: how many top log-probs per token the objective asks of the rollout;
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
                {"teacher": cfg.teacher, "teacher_path": teacher_paths[0]},
            ),
            timeout,
            pg=shared,
            wait=False,
            group_cls=LearnerGroup,
        )
        if shared is not None:
            learner.placement_group = shared  # the learners own it: killed last, it goes with them
        started.append(learner)
        teachers = []
        several = len(cfg.all_teachers) > 1
        for t_cfg, path, bundles_t in zip(cfg.all_teachers, teacher_paths, teacher_bundles(cfg)):
            group = spawn(
                f"teacher {t_cfg.name}" if several else "teacher",
                TeacherScorer,
                bundles_t,
                lambda i, _, t_cfg=t_cfg, path=path: (
                    (t_cfg, path, device, student_path),
                    {
                        "rewards": cfg.rewards if cfg.rewards.enabled else None,
                        "anchor": (cfg.anchor, anchor_use) if cfg.anchor.enabled else None,
                        "max_model_len": cfg.rollout.max_model_len,
                    },
                ),
                timeout,
                # an EMA teacher's state lives in the actor: a restart would silently reset it
                max_restarts=restarts if t_cfg.mode != "ema" else 0,
                wait=False,
                group_cls=TeacherGroup,
            )
            group.name = t_cfg.name
            started.append(group)
            teachers.append(group)
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
                    "lora_rank": cfg.learner.lora.rank,
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
    return Roles(rollout=rollout, teachers=teachers, learner=learner)
