"""What the rollout workers generate each step, and how far ahead of the learner.

`submit_generation` / `collect_generation` spread a batch's seeded requests over the workers
and gather the samples' metadata, redoing the part of a worker that died (after it got the
current weights back); the samples stay in Ray's object store, as a `SampleBatch`'s references
that go on to the teacher. `Rollouts` keeps batches in flight up to `rollout.max_staleness`
steps ahead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, replace

from opd.agent.turns import ToolTurns
from opd.cluster.group import Pending, RoleError
from opd.cluster.roles import Roles
from opd.config import Config
from opd.data.prompts import Prompt, PromptStream
from opd.objectives import Objective
from opd.samples import (
    GenerationRequest,
    Sample,
    SampleBatch,
    batch_seed,
    in_batch_order,
    sample_seed,
)
from opd.signals import TeacherRequest
from opd.sync.weights import WeightSync
from opd.teacher.routing import Router


@dataclass
class Generation:
    """A batch being generated: requests spread over the rollout workers, in flight."""

    pending: Pending
    versions: list[int]  # the policy version each worker must sample with


def prompt_samples(
    cfg: Config,
    prompts: list[Prompt],
    samples_per_prompt: int,
    temperature: float,
    objective: Objective | None = None,
    rewarded: bool = False,
) -> list[Sample]:
    """The prompt side of n samples per prompt, in (prompt, sample) order: with the prompt's
    demonstration (`data.demonstration_field`), the conversation `objective` shows the
    teacher (None: the student's) and, `rewarded`, the record the reward reads."""
    out = []
    router = Router(cfg)
    for i, p in enumerate(prompts):
        demonstration = _field(p, cfg.data.demonstration_field)
        record = reward_record(cfg, p) if rewarded else None
        teacher = router.teacher_of(p.row, f"prompt {p.id}")
        for j in range(samples_per_prompt):
            s = Sample(i, j, p.id, p.messages, p.token_ids, demonstration=demonstration)
            s.temperature, s.record, s.teacher_index = temperature, record, teacher
            if objective is not None:
                s.teacher_messages = objective.teacher_messages(s)
            out.append(s)
    return out


def reward_record(cfg: Config, prompt: Prompt) -> dict:
    """What a reward reads of a prompt: its data row, its id, and its reference answer under
    `answer` (from `data.answer_field`, where set)."""
    record = {**prompt.row, "id": prompt.id}
    if cfg.data.answer_field:
        record["answer"] = _field(prompt, cfg.data.answer_field)
    return record


def submit_generation(
    cfg: Config,
    roles: Roles,
    prompts: list[Prompt],
    *,
    samples_per_prompt: int,
    step: int,
    stream: str,
    max_new_tokens: int,
    temperature: float,
    version: int,
    topk: int = 0,
    objective: Objective | None = None,
) -> Generation:
    """n samples per prompt, seeded by (run.seed, step, prompt, sample), or per worker by
    (run.seed, step, worker) (`rollout.seed_by`), spread over workers; returns at once.
    `version` is the policy version the workers hold now; `objective`: the one whose teacher
    scores the samples, if any (`prompt_samples`)."""
    requests = [
        GenerationRequest(s, sample_seed(cfg.run.seed, step, *s.key, stream))
        for s in prompt_samples(
            cfg,
            prompts,
            samples_per_prompt,
            temperature,
            objective,
            rewarded=stream == "train" and cfg.rewards.enabled,
        )
    ]
    n = len(roles.rollout)
    pending = roles.rollout.submit_generate(
        [(requests[w::n], batch_seed(cfg.run.seed, step, w, stream)) for w in range(n)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=cfg.rollout.top_p if stream == "train" else 1.0,
        topk=topk,
    )
    return Generation(pending, [version] * n)


def collect_generation(
    cfg: Config, roles: Roles, gen: Generation, sync: WeightSync | None
) -> SampleBatch:
    """The batch: its samples' metadata, in (prompt, sample) order, and a reference to each
    worker's samples. A worker that died is restarted by Ray, given the current weights and
    its requests again (same seeds: same samples); a worker that came back while idle is
    caught by the version it reports."""

    def restore(i: int) -> None:
        sync.restore(roles.rollout, i)
        gen.versions[i] = sync.version

    metas = roles.rollout.collect(gen.pending, on_restart=restore)
    for i, part in enumerate(metas):
        if any(m.policy_version != gen.versions[i] for m in part):
            restore(i)  # restarted between calls: it sampled with its initial weights
            roles.rollout.restarts += 1
            roles.rollout.resubmit(gen.pending, i)
            metas[i] = roles.rollout.collect_one(gen.pending, i, on_restart=restore)
            if any(m.policy_version != gen.versions[i] for m in metas[i]):
                raise RoleError(
                    f"rollout[{i}] samples with policy version "
                    f"{metas[i][0].policy_version}, expected {gen.versions[i]}"
                )
    return SampleBatch(in_batch_order(metas), [refs[1] for refs in gen.pending.refs])


def generate_batch(
    cfg: Config, roles: Roles, prompts: list[Prompt], *, sync: WeightSync | None = None, **how
) -> SampleBatch:
    """`submit_generation` (with its keyword arguments `how`, at the policy version `sync`
    holds) + `collect_generation`, blocking."""
    version = sync.version if sync is not None else 0
    gen = submit_generation(cfg, roles, prompts, **how, version=version)
    return collect_generation(cfg, roles, gen, sync)


def generate(
    cfg: Config, roles: Roles, prompts: list[Prompt], *, sync: WeightSync | None = None, **how
) -> list[Sample]:
    """`generate_batch`'s samples, read into the driver (evaluation)."""
    return generate_batch(cfg, roles, prompts, sync=sync, **how).fetch()


def _field(prompt: Prompt, name: str | None) -> str | None:
    if name is None:
        return None
    if name not in prompt.row:
        raise ValueError(f"prompt {prompt.id} has no field {name!r} (data.*_field)")
    return str(prompt.row[name])


def reference_samples(
    cfg: Config, prompts: list[Prompt], tokenizer, version: int, objective: Objective
) -> SampleBatch:
    """Dataset completions in place of student samples (gkd's and sft's batches). With
    `agent:` on, a completion may be a written tool-using conversation (a list of turns, laid
    out as the rollout lays out one: `ToolTurns.demonstration`)."""
    samples = prompt_samples(cfg, prompts, 1, 1.0, objective)
    key, cap = cfg.data.completion_field, cfg.rollout.max_new_tokens
    turns = ToolTurns(tokenizer, cfg.agent.tool_role) if cfg.agent.enabled else None
    for s, p in zip(samples, prompts):
        value = p.row.get(key) if key is not None else None
        if turns is not None and isinstance(value, list):  # a tool-using conversation
            where = f"prompt {p.id}, data.completion_field={key!r}"
            ids, mask, steps = turns.demonstration(value, where)
            s.completion_ids, s.loss_mask, s.step_ids = ids[:cap], mask[:cap], steps[:cap]
        else:
            ids = tokenizer(_field(p, key), add_special_tokens=False)["input_ids"][:cap]
            s.completion_ids = [*ids, tokenizer.eos_token_id]
        s.logprobs = [0.0] * len(s.completion_ids)
        s.finish_reason, s.policy_version, s.on_policy = "reference", version, False
    return SampleBatch.put(samples)


@dataclass
class Batch:
    """One step's batch, from the moment its prompts are taken until the learner uses it."""

    step: int
    generation: Generation | None = None  # None: dataset completions (gkd's off-policy steps)
    samples: SampleBatch | None = None


class Rollouts:
    """Batches generated up to `rollout.max_staleness` steps ahead of the learner.

    The batch of step t is submitted once the weights of step t - 1 - k have been pushed, so
    it samples from a policy at most k updates old; with k = 0 it is submitted after the
    previous step's push: the synchronous loop. The rollout workers run calls in the order
    they are sent, so a push queued behind a generation takes effect after it.
    """

    def __init__(
        self,
        cfg: Config,
        roles: Roles,
        sync: WeightSync,
        stream: PromptStream,
        objective: Objective,
        request: TeacherRequest,
    ):
        self.cfg, self.roles, self.sync, self.stream = cfg, roles, sync, stream
        self.objective, self.request = objective, request
        self.queue: deque[Batch] = deque()
        self.next_step = 0

    def start(self, step: int, pending: list[dict] | None = None) -> None:
        """Learn from `step` on; `pending`: the batches a checkpoint kept (`data_state`), learned
        as they were sampled."""
        self.next_step = step
        for b in pending or []:
            samples = [Sample(**s) for s in b["samples"]]
            for s in samples:  # not kept: what the teacher is shown follows from the sample
                s.teacher_messages = self.objective.teacher_messages(s)
            self.queue.append(Batch(b["step"], samples=SampleBatch.put(samples)))
            self.next_step = b["step"] + 1

    def fill(self, learner_step: int, tokenizer) -> None:
        """Submit batches through step `learner_step + k` (or the last step)."""
        last = min(learner_step + self.cfg.rollout.max_staleness, self.cfg.trainer.steps)
        while self.next_step <= last:
            step = self.next_step
            batch = Batch(step)
            prompts = self.stream.take(self.cfg.rollout.prompts_per_step)
            if self.objective.use_student_samples(step, self.cfg.run.seed):
                batch.generation = submit_generation(
                    self.cfg,
                    self.roles,
                    prompts,
                    samples_per_prompt=self.cfg.rollout.samples_per_prompt,
                    step=step,
                    stream="train",
                    max_new_tokens=self.cfg.rollout.max_new_tokens,
                    temperature=self.cfg.rollout.temperature,
                    version=self.sync.version,
                    topk=self.request.rollout_topk,
                    objective=self.objective,
                )
            else:
                batch.samples = reference_samples(
                    self.cfg, prompts, tokenizer, self.sync.version, self.objective
                )
            self.queue.append(batch)
            self.next_step += 1

    def take(self, step: int) -> SampleBatch:
        batch = self.queue.popleft()
        assert batch.step == step, (batch.step, step)
        stale = (step - 1) - min(m.policy_version for m in self._collected(batch).metas)
        if stale > self.cfg.rollout.max_staleness:
            raise RuntimeError(
                f"step {step}: batch sampled {stale} updates ago, over rollout.max_staleness="
                f"{self.cfg.rollout.max_staleness}"
            )
        return batch.samples

    def data_state(self) -> dict:
        """The prompt stream's position and the batches sampled ahead but not yet learned
        (waited for, and read into the driver): a resume learns from those as an
        uninterrupted run would, rather than sampling their prompts again from newer
        weights. What the teacher is shown is left out (`start` derives it again)."""
        pending = []
        for batch in self.queue:
            samples = self._collected(batch).fetch()
            rows = [asdict(replace(s, teacher_messages=None)) for s in samples]
            pending.append({"step": batch.step, "samples": rows})
        return {**self.stream.state_dict(), "pending": pending}

    def _collected(self, batch: Batch) -> SampleBatch:
        if batch.samples is None:
            gen = batch.generation
            batch.samples = collect_generation(self.cfg, self.roles, gen, self.sync)
        return batch.samples
