"""Rewards of a training step, computed beside the teacher's scores.

The teacher sees every sample of a step at once, so it is where a prompt's whole group is: it
takes the text each model wrote (decoded once by the scorer, `TeacherScorer.written_texts`,
which the anchor reads too), runs the reward (`opd.rewards.runner`: a pool, a timeout per
call, failures counted) on a thread of its own while the model scores the batch, and
normalizes each reward within its prompt's group (`group_advantages`). The learners get each
sample's advantage; the driver gets the metrics.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from opd.objectives.advantages import group_advantages
from opd.rewards.runner import RewardConfig, RewardRunner
from opd.samples import Sample


class StepRewards:
    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.runner: RewardRunner | None = None  # its pool starts on first use
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-rewards")

    def submit(self, samples: list[Sample], texts: list[str]) -> Future:
        """Start rewarding `samples` (each with its `record`), whose written text is `texts`;
        returns at once."""
        if self.runner is None:
            self.runner = RewardRunner(self.cfg)
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
