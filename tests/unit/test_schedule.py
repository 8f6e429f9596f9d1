"""`Rollouts`, the batches kept ahead of the learner, without actors (a local Ray holds the
samples): an objective that trains on dataset completions (sft) fills batches at once, so
checkpointing them and the staleness guard run on the real methods.

A checkpoint keeps the batches sampled ahead but not yet learned, and a resume learns from them
as they were sampled; a batch older than `rollout.max_staleness` updates stops the run (here:
a resume with a smaller bound than the checkpoint's batches were sampled under).
"""

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from opd.config import load_config
from opd.data.prompts import PromptStream, build_prompts
from opd.models.tiny import build_tokenizer, synthetic_examples
from opd.objectives import build_objective
from opd.rollout.schedule import Rollouts

RECIPE = Path(__file__).parents[2] / "recipes/sft/smollm2-135m-facts.yaml"


pytestmark = pytest.mark.usefixtures("local_ray")  # the batches live in Ray's object store


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _rollouts(tokenizer, staleness, sync):
    cfg = load_config(
        RECIPE,
        [
            "data.train_path=unused.jsonl",
            f"rollout.max_staleness={staleness}",
            "rollout.prompts_per_step=2",
            "learner.micro_batch_size=2",
            "trainer.steps=6",
        ],
    )
    prompts, _ = build_prompts(
        synthetic_examples(10, seed=1),
        tokenizer,
        prompt_field="question",
        id_field=None,
        system_prompt=None,
        max_prompt_tokens=64,
        source="rows",
    )
    stream = PromptStream(prompts, cfg.run.seed, shuffle=True)
    objective = build_objective(cfg.objective.name, cfg.objective.params)
    return Rollouts(cfg, None, sync, stream, objective, objective.teacher_request())


def test_a_checkpoint_keeps_the_batches_sampled_ahead(tokenizer):
    sync = SimpleNamespace(version=0)  # the policy version the weight sync has pushed
    straight = _rollouts(tokenizer, 2, sync)
    straight.start(1)
    straight.fill(1, tokenizer)  # batches 1-3, sampled by version 0
    straight.take(1)
    sync.version = 1
    state = json.loads(json.dumps(straight.data_state()))  # as trainer_state.json holds it
    assert [b["step"] for b in state["pending"]] == [2, 3]
    # what the teacher is shown is not kept: the resume derives it again from the objective
    assert all(s["teacher_messages"] is None for b in state["pending"] for s in b["samples"])

    resumed = _rollouts(tokenizer, 2, sync)
    resumed.stream.load_state_dict(state)
    resumed.start(2, state["pending"])
    for step in (2, 3, 4):
        for r in (straight, resumed):
            r.fill(step, tokenizer)
        a, b = straight.take(step), resumed.take(step)
        assert a.metas == b.metas and a.on_policy == b.on_policy, step
        assert [asdict(s) for s in a.fetch()] == [asdict(s) for s in b.fetch()], step
        sync.version = step
    assert [m.policy_version for m in a.metas] == [1] * len(a)  # batch 4, sampled at step 2


def test_a_batch_older_than_max_staleness_stops_the_run(tokenizer):
    sync = SimpleNamespace(version=0)
    ahead = _rollouts(tokenizer, 1, sync)
    ahead.start(1)
    ahead.fill(1, tokenizer)  # batches 1 and 2, sampled by version 0
    ahead.take(1)
    sync.version = 1
    state = ahead.data_state()
    assert ahead.take(2).metas[0].policy_version == 0  # 1 update old: within the bound

    # Resumed with max_staleness 0, the kept batch of step 2 is 1 update old: refused.
    strict = _rollouts(tokenizer, 0, sync)
    strict.start(2, state["pending"])
    with pytest.raises(RuntimeError, match=r"step 2: batch sampled 1 updates ago, over rollout"):
        strict.take(2)
