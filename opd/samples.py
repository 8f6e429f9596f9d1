"""What flows between the roles: sampled completions, with the teacher's scores for them.

A module of its own (not a role's): the rollout makes samples, the teacher scores them and the
learner learns from them, and none of the three imports another."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from opd.signals.base import Scores


def sample_seed(
    run_seed: int, step: int, prompt_index: int, sample_index: int, stream: str = "train"
) -> int:
    """The sampling seed of one completion: a pure function of where it sits in the run."""
    return _seed(f"{stream}/{run_seed}/{step}/{prompt_index}/{sample_index}")


def batch_seed(run_seed: int, step: int, worker: int, stream: str = "train") -> int:
    """The sampling seed of one rollout worker's call (`rollout.seed_by: batch`)."""
    return _seed(f"batch/{stream}/{run_seed}/{step}/{worker}")


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % (
        2**31 - 1
    )


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    seed: int
    key: tuple[int, int]  # (prompt_index, sample_index) within the step


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_id: str
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # rollout engine's log pi_old of each completion token
    finish_reason: str
    policy_version: int
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

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)
