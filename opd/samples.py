"""What flows between the roles: sampled completions, with the teacher's scores for them.

A module of its own (not a role's): the rollout makes samples, the teacher scores them and the
learner learns from them, and none of the three imports another. The samples go from one role to
the next as Ray object references; the driver holds a batch's metadata only (`SampleBatch`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from opd.signals.base import Scores


def sample_seed(
    run_seed: int, step: int, prompt_index: int, sample_index: int, stream: str = "train"
) -> int:
    """The sampling seed of one completion: a pure function of where it sits in the run."""
    return _seed(f"{stream}/{run_seed}/{step}/{prompt_index}/{sample_index}")


def batch_seed(run_seed: int, step: int, worker: int, stream: str = "train") -> int:
    """The sampling seed of one rollout worker's call (`rollout.seed_by: batch`)."""
    return _seed(f"batch/{stream}/{run_seed}/{step}/{worker}")


def turn_seed(seed: int, turn: int) -> int:
    """The seed of a trajectory's turn (`opd.agent`): turn 0 samples with the request's own
    seed, later turns with one derived from it and the turn."""
    return seed if turn == 0 else _seed(f"turn/{seed}/{turn}")


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % (
        2**31 - 1
    )


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_id: str
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    # the completion side, filled by the rollout worker (empty in a request's prompt side)
    completion_ids: list[int] = field(default_factory=list)
    # the engine's log pi_old of each token; None: not asked of the engine
    # (`rollout.sampler_logprobs: false`), the learner's own log-probs stand in
    logprobs: list[float] | None = field(default_factory=list)
    finish_reason: str = ""
    policy_version: int = 0
    topk_ids: list[list[int]] | None = None  # the engine's top-k ids per position, if asked
    teacher: Scores | None = None  # the requested signal's scores, filled by the teacher
    teacher_version: int = 0
    # the conversation the teacher scores the completion after (the objective's
    # `teacher_messages`); None: `messages`
    teacher_messages: list[dict[str, str]] | None = None
    demonstration: str | None = None  # the teacher's extra context (sdft), if any
    on_policy: bool = True  # False for dataset completions (gkd's off-policy batches)
    # the sampling temperature: `logprobs` are of pi_old with its logits divided by it, and the
    # learner computes its log-probs of these tokens the same way
    temperature: float = 1.0
    # what the reward reads (`rewards:`): the prompt's data row with its id and answer; the
    # teacher rewards the sample beside its own scores, and the learners get the advantage
    record: dict | None = None
    advantage: float | None = None  # the reward normalized within its prompt's group
    # the discriminator anchor's term (`anchor:`): coef x its group-centered log D, or its
    # sequence weight for sft; set beside the teacher's scores
    anchor: float | None = None
    # a multi-turn trajectory (`agent:`): per completion token, 1 where the model wrote it and
    # 0 where the loop inserted it (a tool's output, the chat template around it), and the
    # step (assistant turn, from 0) it belongs to; None: one turn, every token the model's
    loss_mask: list[int] | None = None
    step_ids: list[int] | None = None
    tool_calls: list[dict] | None = None  # each call's turn, code, status and output (shown)
    teacher_index: int = 0  # which teacher scores it (`Config.all_teachers`, `data.route_field`)

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def n_counted(self) -> int:
        """Completion tokens that enter the loss: the model-written ones."""
        return self.n_tokens if self.loss_mask is None else sum(self.loss_mask)

    @property
    def written_ids(self) -> list[int]:
        """The completion tokens the model wrote: what a reward or a grader reads (a tool's
        output between the turns is not the model's answer)."""
        if self.loss_mask is None:
            return self.completion_ids
        return [t for t, m in zip(self.completion_ids, self.loss_mask, strict=True) if m]

    @property
    def key(self) -> tuple[int, int]:
        """(prompt_index, sample_index): its place in the step's batch."""
        return (self.prompt_index, self.sample_index)

    def meta(self) -> SampleMeta:
        return SampleMeta(
            self.prompt_index,
            self.sample_index,
            self.n_tokens,
            self.finish_reason,
            self.policy_version,
            -1 if self.loss_mask is None else self.n_counted,
            len(self.tool_calls or ()),
            len(self.prompt_ids),
            self.teacher_index,
        )


@dataclass(frozen=True)
class SampleMeta:
    """What the driver keeps of a sample: where it sits, how long it is and how it ended, and
    the policy that sampled it. The rest travels between the roles by reference."""

    prompt_index: int
    sample_index: int
    n_tokens: int
    finish_reason: str
    policy_version: int
    n_counted: int = -1  # tokens that enter the loss (model-written); -1: all n_tokens
    n_tool_calls: int = 0
    prompt_tokens: int = 0
    teacher_index: int = 0  # which teacher scores it (`Config.all_teachers`)
    worker_s: float = 0.0  # seconds its rollout worker's generate call took (a profile)

    @property
    def loss_tokens(self) -> int:
        return self.n_tokens if self.n_counted < 0 else self.n_counted

    @property
    def key(self) -> tuple[int, int]:
        return (self.prompt_index, self.sample_index)


@dataclass
class GenerationRequest:
    """One completion to sample: `sample` is its prompt side (the completion side empty),
    which the rollout worker fills in."""

    sample: Sample
    seed: int


def in_batch_order(parts):
    """The samples (or their metadata) of `parts`, one list per rollout worker, merged in
    (prompt, sample) order: the order of a step's batch wherever it is assembled."""
    return sorted((x for part in parts for x in part), key=lambda x: x.key)


@dataclass
class SampleBatch:
    """One step's samples as the driver holds them: each sample's metadata, in (prompt, sample)
    order, and references to the samples themselves, which go on to the teacher unread."""

    metas: list[SampleMeta]
    parts: list  # object references, each to a list of Samples (one rollout worker's)
    on_policy: bool = True  # False: dataset completions (gkd's off-policy batches)

    def __len__(self) -> int:
        return len(self.metas)

    def fetch(self) -> list[Sample]:
        """The samples themselves, in (prompt, sample) order: read into the driver, so only
        for evaluation and checkpoints."""
        import ray

        return in_batch_order(ray.get(self.parts))

    @classmethod
    def put(cls, samples: list[Sample]) -> SampleBatch:
        """Samples the driver holds (dataset completions, a checkpoint's batches), stored once
        in Ray's object store."""
        import ray

        samples = in_batch_order([samples])
        on_policy = all(s.on_policy for s in samples)
        return cls([s.meta() for s in samples], [ray.put(samples)], on_policy)
