"""Rewards of a training step, computed beside the teacher's scores.

The teacher sees every sample of a step at once, so it is where a prompt's whole group is: it
decodes the completions with the student's tokenizer, runs the reward (`opd.rewards.runner`:
a pool, a timeout per call, failures counted) on a thread of its own while the model scores
the batch, and normalizes each reward within its prompt's group (`group_advantages`). The
learners get each sample's advantage; the driver gets the metrics.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from opd.objectives.advantages import group_advantages
from opd.rewards.runner import RewardConfig, RewardRunner
from opd.samples import Sample


class StepRewards:
    def __init__(self, cfg: RewardConfig, student_path: str | None) -> None:
        if student_path is None:
            raise ValueError("rewards need the student's tokenizer: no student path was given")
        self.cfg, self.student_path = cfg, student_path
        self.tokenizer = None  # loaded on first use, like the runner's pool
        self.runner: RewardRunner | None = None
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-rewards")

    def submit(self, samples: list[Sample]) -> Future:
        """Start rewarding `samples` (each with its `record`); returns at once."""
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.student_path)
            self.runner = RewardRunner(self.cfg)
        texts = self.tokenizer.batch_decode(
            [s.written_ids for s in samples], skip_special_tokens=True
        )
        return self.thread.submit(self.runner.score, [s.record for s in samples], texts)

    def apply(self, samples: list[Sample], pending: Future) -> dict[str, float]:
        """Wait for `pending` (from `submit(samples)`), set each sample's advantage (its reward
        within the samples of its prompt), and return the step's reward metrics. The runner's
        child processes end with the actor (their pipe closes)."""
        batch = pending.result()
        advantages, groups = group_advantages(
            batch.rewards,
            [s.prompt_index for s in samples],
            scale=self.cfg.advantage_scale,
            eps=self.cfg.advantage_eps,
        )
        for s, a in zip(samples, advantages, strict=True):
            s.advantage = float(a)
        return {**batch.stats.metrics(), **groups.metrics()}
