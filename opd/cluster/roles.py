"""Start the three roles of a run as Ray actor groups."""

from __future__ import annotations

from dataclasses import dataclass

from opd.cluster.group import ActorGroup
from opd.cluster.placement import colocated_bundles, reserve, role_bundles, spawn
from opd.config.schema import Config


@dataclass
class Roles:
    rollout: ActorGroup
    teacher: ActorGroup
    learner: ActorGroup

    def shutdown(self) -> None:
        for group in (self.rollout, self.teacher, self.learner):  # learners last: see above
            group.kill()


def start_roles(
    cfg: Config, student_path: str, teacher_path: str, device: str, rollout_topk: int = 0
) -> Roles:
    """`rollout_topk`: how many top log-probs per token the objective asks of the rollout."""
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
            {},
        ),
        timeout,
        pg=shared,
    )
    if shared is not None:
        learner.placement_group = shared  # the learners own it: killed last, it goes with them
    teacher = spawn(
        "teacher",
        TeacherScorer,
        bundles["teacher"],
        lambda i, _: ((cfg.teacher, teacher_path, device, student_path), {}),
        timeout,
        # an EMA teacher's state lives in the actor: a restart would silently reset it
        max_restarts=restarts if cfg.teacher.mode != "ema" else 0,
    )
    rollout = spawn(
        "rollout",
        RolloutWorker,
        bundles["rollout"],
        lambda i, _: (
            (student_path, cfg.rollout, cfg.run.seed, device, cfg.student.gguf_file),
            {"compilation_config": cfg.rollout.compilation_config, "max_logprobs": rollout_topk},
        ),
        timeout,
        max_restarts=restarts,
        pg=shared,
    )
    return Roles(rollout=rollout, teacher=teacher, learner=learner)
