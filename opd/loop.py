"""The training loop: sample -> score -> learn -> sync -> eval / checkpoint, top to bottom."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray
import torch

from opd.cluster.group import RoleError
from opd.cluster.placement import check_devices, check_fits, check_gpu_packing
from opd.cluster.roles import Roles, start_roles
from opd.config import Config, to_yaml
from opd.config.loader import from_yaml
from opd.data.prompts import Prompt, PromptStream, read_rows, recipe_prompts
from opd.data.sources import resolve_data
from opd.learner.checkpoint import CheckpointDir, CheckpointError, rng_state, set_rng_state
from opd.metrics import MetricsLog
from opd.models.sources import resolve_model
from opd.objectives import Objective, build_objective
from opd.objectives.base import step_normalizer
from opd.progress import Phases, Progress
from opd.rollout.schedule import Rollouts, generate, generate_batch
from opd.rundir import RunError, RunLock
from opd.samples import Sample, SampleBatch, SampleMeta
from opd.signals import TeacherRequest, signal_of
from opd.sync.weights import WeightSync, make_weight_sync
from opd.teacher import pool
from opd.teacher.routing import Router


@dataclass
class RunData:
    train: PromptStream
    heldout: list[Prompt]
    dropped: int


def agent_metrics(metas) -> dict[str, float]:
    """Tool use of a step's trajectories (`agent:`): calls per sample, the share of samples
    that called a tool, and model-written tokens per sample; nothing for single-turn steps."""
    if all(m.n_counted < 0 for m in metas):
        return {}
    n = len(metas)
    return {
        "agent/tool_calls": sum(m.n_tool_calls for m in metas) / n,
        "agent/tool_call_rate": sum(m.n_tool_calls > 0 for m in metas) / n,
        "agent/model_tokens": sum(m.loss_tokens for m in metas) / n,
    }


def load_data(cfg: Config, tokenizer) -> RunData:
    """Training and held-out prompts; without `data.heldout_path`, the first
    `eval.heldout_prompts` training rows are held out (and not trained on)."""
    d = cfg.data

    router = Router(cfg)

    def prompts(path: str):
        source = resolve_data(path)
        out, dropped = recipe_prompts(d, read_rows(source), tokenizer, str(source))
        for p in out:  # each prompt picks a teacher, or the run stops here, naming it
            try:
                router.teacher_of(p.row, f"{source}: prompt {p.id}")
            except ValueError as e:
                raise RunError(str(e)) from e
        return out, dropped

    train, dropped = prompts(d.train_path)
    n_held = cfg.eval.heldout_prompts
    if d.heldout_path:
        heldout, dropped_h = prompts(d.heldout_path)
        dropped += dropped_h
    else:
        heldout, train = train[:n_held], train[n_held:]
    return RunData(PromptStream(train, cfg.run.seed, d.shuffle), heldout[:n_held], dropped)


def score(
    roles: Roles, sync: WeightSync, samples: list[Sample], request: TeacherRequest
) -> list[Sample]:
    """The samples with their teachers' scores, in the driver (held-out metrics); a teacher
    that died is restarted by Ray (a following teacher gets the current weights again) and
    scores the same samples."""
    return pool.score(roles.teachers, sync.restore, samples, request)


def score_for_learners(
    roles: Roles, sync: WeightSync, batch: SampleBatch, request: TeacherRequest
) -> tuple[list, int, dict[str, float]]:
    """The teachers score (and, where they carry a record, reward) the batch's samples as
    `request` asks and keep them: per learner rank, references to its samples (positions
    r::n of the batch), which the rank fetches itself; returns those, the first teacher's
    version and the reward metrics, all the driver reads. Restarts as in `score`."""
    return pool.score_for_learners(roles.teachers, sync.restore, batch, request, len(roles.learner))


def heldout_samples(
    cfg: Config,
    roles: Roles,
    sync: WeightSync,
    heldout: list[Prompt],
    objective: Objective | None = None,
) -> SampleBatch:
    """Held-out completions at temperature 1, with the same seeds at every evaluation, so
    successive evaluations differ only through the weights; `objective`: the one whose
    teacher will score them (None: the student's conversation)."""
    return generate_batch(
        cfg,
        roles,
        heldout,
        sync=sync,
        samples_per_prompt=cfg.eval.heldout_samples,
        step=0,
        stream="heldout",
        max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        temperature=1.0,
        objective=objective,
    )


def heldout_reverse_kl(
    cfg: Config, roles: Roles, sync: WeightSync, heldout: list[Prompt]
) -> dict[str, float]:
    """Mean per-token sampled estimate of KL(student || teacher) on the held-out prompts."""
    samples = heldout_samples(cfg, roles, sync, heldout).fetch()
    samples = score(roles, sync, samples, TeacherRequest())

    def diff(of: list[Sample]) -> torch.Tensor:
        return torch.cat([torch.tensor(s.logprobs) - s.teacher.logprobs_BT[0] for s in of])

    every = diff(samples)
    out = {
        "heldout/reverse_kl": every.mean().item(),
        "heldout/completion_tokens": every.numel() / len(samples),
    }
    if len(roles.teachers) > 1:  # and per teacher, on the prompts routed to it
        for t, group in enumerate(roles.teachers):
            mine = [s for s in samples if s.teacher_index == t]
            if mine:
                out[f"heldout/{group.name}/reverse_kl"] = diff(mine).mean().item()
    return out


def heldout_objective(
    cfg: Config, roles: Roles, sync: WeightSync, heldout: list[Prompt], objective: Objective
) -> dict[str, float]:
    """A teacher that cannot score the student's token ids (another tokenizer): the learner
    evaluates the objective itself on the held-out completions (simct: the aligned KL)."""
    batch = heldout_samples(cfg, roles, sync, heldout, objective)
    n = len(roles.learner)
    if len(batch) < n:
        raise ValueError(
            f"eval.heldout_prompts x eval.heldout_samples = {len(batch)} is fewer than "
            f"learner.num_workers={n}: every learner rank needs a held-out sample"
        )
    shards, _, _ = score_for_learners(roles, sync, batch, objective.teacher_request())
    sums: dict[str, float] = {}
    for part in roles.learner.evaluate([tuple(shard) for shard in shards]):
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    tokens = max(1.0, sums.pop("tokens"))
    out = {f"heldout/{k}": v / tokens for k, v in sums.items()}
    out["heldout/completion_tokens"] = tokens / len(batch)
    return out


def evaluation(
    cfg: Config, roles: Roles, sync: WeightSync, data: RunData, tokenizer, objective: Objective
) -> dict[str, float]:
    """Held-out metrics: the reverse KL to the teacher where it scores the student's tokens,
    else the objective's own; and the recipe's benchmarks."""
    if signal_of(objective.teacher_request()).scores_student_tokens:
        metrics = heldout_reverse_kl(cfg, roles, sync, data.heldout)
    else:
        metrics = heldout_objective(cfg, roles, sync, data.heldout, objective)
    if cfg.eval.benchmarks:
        from opd.eval.during_training import benchmark_metrics

        metrics.update(benchmark_metrics(cfg, roles, tokenizer, partial(generate, sync=sync)))
    return metrics


def learn(roles: Roles, metas: list[SampleMeta], shards: list, objective: Objective) -> dict:
    """One optimizer step: rank r learns from its scored shard (`shards[r]`, references the
    rank resolves, one per scorer); the step's normalizer comes from the samples' metadata."""
    normalizer = step_normalizer(objective, [m.loss_tokens for m in metas])
    return roles.learner.train_step([(normalizer, *shard) for shard in shards])


def save_checkpoint(
    ckpt: CheckpointDir, roles: Roles, cfg: Config, step: int, data_state: dict
) -> None:
    def write(tmp: Path) -> None:
        roles.learner.save_checkpoint(str(tmp / "learner"))
        roles.teacher.save_state(str(tmp / "teacher"))

    state = {"step": step, "data": data_state, "rng": rng_state(), "config": to_yaml(cfg)}
    ckpt.save(step, write, state)


def load_checkpoint(roles: Roles, path: Path) -> None:
    """The learners' and the teacher's state from checkpoint `path`; a file a learner refuses
    (damaged, or holding more than weights) is a CheckpointError naming it."""
    try:
        roles.learner.load_checkpoint(str(path / "learner"))
    except RoleError as e:
        cause = getattr(e.__cause__, "cause", None)  # the learner's own exception
        if isinstance(cause, CheckpointError):
            raise CheckpointError(f"resuming from {path}: {cause}") from e
        raise
    roles.teacher.load_state(str(path / "teacher"))


# what may differ between a run and its resumption without asking: how long it runs, and how
# it is watched or reached
RESUMABLE_CHANGES = (
    "trainer.steps",
    "run.resume",
    "run.resume_changed",
    "run.progress",
    "cluster.address",
    "cluster.num_cpus",
    "cluster.timeout_s",
)


def check_same_run(run_dir: Path, cfg: Config) -> None:
    """Resuming `run_dir` with a recipe other than the one it was started with would silently
    train on, under new settings, from the old run's state: refused with the difference,
    unless `run.resume_changed` (or a fresh start, `run.resume=false`)."""
    import difflib

    from omegaconf import OmegaConf

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return

    def lines(c: Config) -> list[str]:
        """One `dotted.key = value` line per setting, less those that may change."""
        out: list[str] = []

        def walk(node, prefix: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{prefix}{k}.")
            elif prefix[:-1] not in RESUMABLE_CHANGES:
                out.append(f"{prefix[:-1]} = {node!r}")

        walk(OmegaConf.to_container(OmegaConf.structured(c)), "")
        return out

    try:  # read onto today's schema: keys added since the run started take their defaults
        before = lines(from_yaml(saved.read_text()))
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never trusted
        raise RunError(f"{saved} cannot be read ({e}); move it away to resume") from e
    now = lines(cfg)
    if before == now:
        return
    diff = "\n".join(difflib.unified_diff(before, now, str(saved), "this recipe", n=0, lineterm=""))
    raise RunError(
        f"{run_dir} holds a run started with other settings:\n{diff}\n"
        "resume it with them anyway: run.resume_changed=true; start over there: "
        "run.resume=false; or choose another run.output_dir"
    )


def train(cfg: Config) -> Path:
    """Run (or resume) `cfg`; one run at a time holds `run.output_dir` (`RunLock`)."""
    run_dir = Path(cfg.run.output_dir)
    with RunLock(run_dir):
        return _train(cfg, run_dir)


def _train(cfg: Config, run_dir: Path) -> Path:
    ckpt = CheckpointDir(run_dir / "checkpoints", cfg.checkpoint.keep_last)
    ckpt.clear_partial()
    if cfg.run.resume:
        resume = ckpt.latest()  # the newest intact checkpoint
    else:
        ckpt.clear()
        resume = None
    start = resume[1]["step"] if resume else 0
    if resume and not cfg.run.resume_changed:
        check_same_run(run_dir, cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if start >= cfg.trainer.steps and (run_dir / "student").is_dir():
        print(f"{run_dir}: already trained to step {start} (trainer.steps={cfg.trainer.steps})")
        return run_dir
    log = MetricsLog(run_dir / "metrics.jsonl", start if resume else None)

    from transformers import AutoTokenizer

    device = _device(cfg)
    try:
        check_devices(cfg, device)
    except ValueError as e:
        raise RunError(str(e)) from e
    phases = Phases(enabled=cfg.run.progress)
    with phases("preparing the models (built from the registry on first use)"):
        student = str(resolve_model(cfg.student.path))
        teachers = [str(resolve_model(t.path)) for t in cfg.all_teachers]
    tokenizer = AutoTokenizer.from_pretrained(student)
    if cfg.student.chat_template:
        tokenizer.chat_template = cfg.student.chat_template
    with phases("loading the data"):
        data = load_data(cfg, tokenizer)
    objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.import_path)
    request = objective.teacher_request()

    with phases("starting Ray"):
        _init_ray(cfg)
    resources = ray.cluster_resources()
    try:  # the cluster joined may differ from what `opd validate` could see
        check_fits(cfg, resources)
        check_gpu_packing(cfg, int(resources.get("GPU", 0)))
    except ValueError as e:
        raise RunError(f"the Ray cluster: {e}") from e
    colocated = cfg.cluster.placement == "colocated"
    sleeps = colocated and cfg.rollout.sleep  # vLLM gives the devices up while others run
    with phases("starting the learners, teachers and vLLM engines"):
        roles = start_roles(
            cfg, student, teachers, device, request.rollout_topk, objective.anchor_use()
        )
    sync = None
    try:
        if cfg.logging.backends:
            from omegaconf import OmegaConf

            from opd.tracking import Trackers

            plain = OmegaConf.to_container(OmegaConf.structured(cfg))
            log.trackers = Trackers(cfg.logging, run_dir, {"dict": plain, "yaml": to_yaml(cfg)})
        sync = make_weight_sync(
            cfg.rollout.weight_sync,
            device,
            roles.learner,
            roles.rollout,
            cfg.rollout.dtype,
            teacher=roles.teacher if cfg.teacher.mode != "frozen" else None,
            colocated=colocated,
            lora=cfg.learner.lora.enabled,
        )
        for group in roles.teachers:
            for line in group.signal_report(request):
                print(line if len(roles.teachers) == 1 else f"teacher {group.name}: {line}")
        if resume:
            load_checkpoint(roles, resume[0])
            data.train.load_state_dict(resume[1]["data"])
            set_rng_state(resume[1]["rng"])
            # an EMA teacher's state came from the checkpoint; a live one copies the student
            sync.push(version=start, update_teacher=cfg.teacher.mode == "live")
        elif cfg.eval.every and cfg.eval.at_start:
            with phases("the step-0 evaluation"):
                metrics0 = evaluation(cfg, roles, sync, data, tokenizer, objective)
            log.write(0, {**metrics0, "data/dropped_prompts": data.dropped})

        progress = Progress(cfg.trainer.steps, start, enabled=cfg.run.progress)
        preemption = PreemptionFlag()
        rollouts = Rollouts(cfg, roles, sync, data.train, objective, request)
        rollouts.start(start + 1, resume[1]["data"].get("pending") if resume else None)
        for step in range(start + 1, cfg.trainer.steps + 1):
            t0 = time.perf_counter()
            rollouts.fill(step, tokenizer)
            batch = rollouts.take(step)
            t1 = time.perf_counter()
            if sleeps:
                roles.rollout.sleep()  # the teacher and the learner get the devices
            t_sleep = time.perf_counter() - t1
            shards, teacher_version, rewards = score_for_learners(roles, sync, batch, request)
            t2 = time.perf_counter()
            metrics = learn(roles, batch.metas, shards, objective)
            t3 = time.perf_counter()
            if sleeps:
                roles.rollout.wake_up()
                metrics.update({"time/sleep": t_sleep, "time/wake_up": time.perf_counter() - t3})
            metrics.update(sync.push(version=step))
            t4 = time.perf_counter()

            metas = batch.metas
            tokens = sum(m.n_tokens for m in metas)
            versions = [m.policy_version for m in metas]
            metrics.update(
                {
                    "time/rollout": t1 - t0,
                    "time/teacher": t2 - t1,
                    "time/learn": t3 - t2,
                    "time/sync": t4 - t3,
                    "time/step": t4 - t0,
                    # inside time/rollout (ahead of it with async rollouts): the slowest
                    # worker's generate call; the rest is Ray's and the driver's share
                    "time/rollout_worker": max(m.worker_s for m in metas),
                    "perf/tokens_per_s": tokens / (t4 - t0),
                    "rollout/samples": float(len(metas)),
                    **agent_metrics(metas),
                    "rollout/completion_tokens": tokens / len(metas),
                    "rollout/truncated": sum(m.finish_reason == "length" for m in metas)
                    / len(metas),
                    "rollout/policy_version": float(min(versions)),
                    "rollout/staleness": float(step - 1 - min(versions)),
                    "rollout/teacher_version": float(teacher_version),
                    "rollout/on_policy": float(batch.on_policy),
                    "rollout/restarts": float(roles.rollout.restarts),
                    "teacher/restarts": float(sum(g.restarts for g in roles.teachers)),
                    **rewards,
                }
            )
            if cfg.eval.every and step % cfg.eval.every == 0:
                metrics.update(evaluation(cfg, roles, sync, data, tokenizer, objective))
            log.write(step, metrics)  # before the checkpoint: a resume drops lines past it
            last = step == cfg.trainer.steps
            if (
                last
                or preemption.requested
                or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            ):
                save_checkpoint(ckpt, roles, cfg, step, rollouts.data_state())
            progress.update(step, metrics)
            if preemption.requested and not last:
                raise Preempted(f"SIGTERM: checkpoint written at step {step}; re-run to resume")
        progress.close()
        if cfg.checkpoint.export_student:
            roles.learner.save_pretrained(str(run_dir / "student"), student)
    finally:
        if sync is not None:
            sync.close()
        roles.shutdown()
        log.close()
    return run_dir


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after checkpointing its last finished step."""


class PreemptionFlag:
    """SIGTERM (a scheduler's pre-emption) lets the current step finish and be checkpointed."""

    def __init__(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame) -> None:
        self.requested = True


def _device(cfg: Config) -> str:
    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def _init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    kwargs = (
        {"address": cfg.cluster.address}
        if cfg.cluster.address
        else {"num_cpus": cfg.cluster.num_cpus}
    )
    ray.init(**kwargs, log_to_driver=True, include_dashboard=False)
