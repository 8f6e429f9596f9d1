"""Several teachers and teacher replicas: routing, the split over replicas, merged metrics, and
scores that do not depend on how many scorers produced them."""

import itertools
import random

import pytest
import torch
from omegaconf import OmegaConf

from opd.config.loader import ConfigError, load_config
from opd.config.schema import Config, TeacherConfig
from opd.objectives import TeacherRequest
from opd.objectives.advantages import group_advantages
from opd.rewards.runner import reward_stats
from opd.samples import Sample, SampleMeta, in_batch_order
from opd.teacher.routing import Router, merge_metrics, split_by_tokens


def _cfg(**over) -> Config:
    base = {
        "student": {"path": "s"},
        "data": {"train_path": "x", "route_field": "domain"},
        "teacher": {"path": "m", "name": "math", "route": ["math", "algebra"]},
        "teachers": [{"path": "c", "name": "code", "route": ["code"]}],
    }
    merged = OmegaConf.merge(OmegaConf.structured(Config), base, OmegaConf.create(over))
    return OmegaConf.to_object(merged)


def test_prompts_go_to_the_teacher_their_field_names():
    router = Router(_cfg())
    assert router.teacher_of({"domain": "algebra"}, "row 0") == 0
    assert router.teacher_of({"domain": "code"}, "row 1") == 1
    with pytest.raises(ValueError, match=r"row 2: data.route_field 'domain' = 'bio' matches no"):
        router.teacher_of({"domain": "bio"}, "row 2")
    with pytest.raises(ValueError, match=r"row 3: .* = None"):
        router.teacher_of({}, "row 3")
    # a teacher without a route takes the rest
    rest = Router(_cfg(teachers=[{"path": "c", "name": "general", "route": []}]))
    assert rest.teacher_of({"domain": "bio"}, "row 2") == 1
    assert rest.teacher_of({"domain": "math"}, "row 2") == 0
    assert (
        Router(_cfg(teachers=[], data={"route_field": None}, teacher={"route": []})).teacher_of(
            {"domain": "bio"}, "row"
        )
        == 0
    )


@pytest.mark.parametrize(
    "over, message",
    [
        ({"data": {"route_field": None}}, "set data.route_field"),
        ({"teachers": [{"path": "c", "name": "math"}]}, "teacher names must differ"),
        ({"teachers": [{"path": "c", "name": "c", "route": ["math"]}]}, "claimed by teachers"),
        (
            {"teachers": [{"path": "m", "name": "c", "mode": "ema"}], "student": {"path": "m"}},
            "mode='ema' with several teachers",
        ),
        (
            {"teacher": {"route": []}, "teachers": [{"path": "c", "name": "c"}]},
            "have no route: at most one",
        ),
        ({"teachers": []}, "list the others under teachers"),
        ({"teachers": [{"path": "c", "name": "a b"}]}, "use letters, digits"),
        ({"teacher": {"num_workers": 0}}, "teacher.num_workers"),
        (
            {
                "teachers": [
                    {"path": "c", "name": "c", "route": ["code"], "full_transport": "hidden"}
                ]
            },
            "teachers\\[0\\].full_transport=hidden with several teachers",
        ),
    ],
)
def test_teacher_lists_that_cannot_work_are_refused_naming_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**over)


def test_several_teachers_send_full_scores_as_logits():
    """The learners may keep one teacher's LM head (`full` over hidden states) only when there
    is one teacher."""
    from opd.signals.full import transport

    assert all(transport(t) == "logits" for t in _cfg().all_teachers)
    assert transport(TeacherConfig(path="m")) == "hidden"


def test_a_recipe_of_several_teachers_loads(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "student: {path: s}\ndata: {train_path: x, route_field: domain}\n"
        "teacher: {path: m, name: math, route: [math]}\n"
        "teachers:\n  - {path: c, name: code, route: [code], num_workers: 2}\n"
    )
    cfg = load_config(recipe)
    assert [t.name for t in cfg.all_teachers] == ["math", "code"]
    assert cfg.teachers[0].num_workers == 2
    recipe.write_text(recipe.read_text().replace("num_workers: 2", "bogus: 2"))
    with pytest.raises(ConfigError, match="bogus"):
        load_config(recipe)


def _metas(lengths: list[list[int]]) -> list[SampleMeta]:
    return [
        SampleMeta(p, j, n, "stop", 0, prompt_tokens=3)
        for p, ns in enumerate(lengths)
        for j, n in enumerate(ns)
    ]


def test_replicas_get_whole_prompts_balanced_by_tokens():
    rng = random.Random(0)
    for trial in range(200):
        lengths = [[rng.randint(1, 50) for _ in range(rng.randint(1, 3))] for _ in range(7)]
        metas = _metas(lengths)
        replicas = rng.randint(1, 4)
        split = split_by_tokens(metas, replicas)
        assert sorted(i for part in split for i in part) == list(range(len(metas)))
        for part in split:  # a prompt's samples stay together (its group is centered there)
            for p in {metas[i].prompt_index for i in part}:
                assert all(metas[i].prompt_index != p for q in split if q is not part for i in q)
        cost = [sum(n + 3 for n in ns) for ns in lengths]
        loads = [sum(metas[i].n_tokens + 3 for i in part) for part in split]
        # brute force: the best assignment of whole prompts; greedy stays within 4/3 of it
        best = min(
            max(sum(c for c, r in zip(cost, a) if r == k) for k in range(replicas))
            for a in itertools.product(range(replicas), repeat=len(cost))
        )
        assert max(loads) <= 4 / 3 * best + 1e-9, (trial, loads, best)
        assert split == split_by_tokens(metas, replicas)  # depends on the batch only


def _reward_metrics(rewards, groups, status):
    stats = reward_stats(rewards, status, 1.0)
    _, g = group_advantages(rewards, groups)
    return {**stats.metrics(), **g.metrics()}


def test_reward_metrics_of_several_scorers_merge_into_the_whole_batchs():
    rng = random.Random(1)
    groups = [p for p in range(6) for _ in range(3)]
    rewards = [float(rng.choice([0, 0.5, 1])) for _ in groups]
    status = [rng.choice(["ok", "ok", "timeout", "error"]) for _ in groups]
    whole = _reward_metrics(rewards, groups, status)
    whole["anchor/D"] = sum(rewards) / len(rewards)
    parts = []
    for members in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]):
        m = _reward_metrics(
            [rewards[i] for i in members],
            [groups[i] for i in members],
            [status[i] for i in members],
        )
        m["anchor/D"] = sum(rewards[i] for i in members) / len(members)
        parts.append((m, len(members)))
    merged = merge_metrics(parts)
    assert merged.keys() == whole.keys()
    for k in whole:
        assert merged[k] == pytest.approx(whole[k], abs=1e-12), k


def _batch(n_prompts=5, per=2):
    rng = random.Random(2)
    out = []
    for p in range(n_prompts):
        for j in range(per):
            c = [rng.randint(3, 60) for _ in range(rng.randint(1, 6))]
            out.append(
                Sample(
                    p,
                    j,
                    str(p),
                    [{"role": "user", "content": f"q{p}"}],
                    [0, 7 + p, 9],
                    c,
                    [0.0] * len(c),
                    "stop",
                    0,
                )
            )
    return out


@pytest.mark.parametrize("budget", [1, 64])
def test_replicas_score_exactly_what_one_scorer_scores(tiny_pair, budget):
    """The learner ranks' samples and scores are the same from one scorer or from three
    replicas, each given its part of the batch (`TeacherScorer.score_shards`): bit for bit
    with one sample per forward (budget 1), to float rounding where a forward pads several
    samples together (which samples share a forward differs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.teacher.scorer import TeacherScorer

    path = str(tiny_pair["teacher"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = TeacherConfig(path=path, token_budget=budget)
    scorer = TeacherScorer(cfg, model=model, tokenizer=tok)
    request, shards = TeacherRequest("sampled"), 2

    parts = [_batch()[0::2], _batch()[1::2]]  # two rollout workers' lists
    (_, _, n), *single = scorer.score_shards(request, shards, None, *parts)
    assert n == 10

    metas = [s.meta() for s in in_batch_order(parts)]
    split = split_by_tokens(metas, 3)
    assert all(split)
    per_rank = [[] for _ in range(shards)]
    for part in split:
        ranks = {metas[i].key: i % shards for i in part}
        (_, _, n_part), *out = scorer.score_shards(
            request, shards, ranks, *[_batch()[0::2], _batch()[1::2]]
        )
        assert n_part == len(part)
        for r in range(shards):
            per_rank[r].append(out[r])
    for r in range(shards):
        merged = in_batch_order(per_rank[r])
        assert [s.key for s in merged] == [s.key for s in single[r]]
        for a, b in zip(merged, single[r]):
            if budget == 1:
                assert torch.equal(a.teacher.logprobs_BT, b.teacher.logprobs_BT)
            else:
                torch.testing.assert_close(
                    a.teacher.logprobs_BT, b.teacher.logprobs_BT, rtol=0, atol=1e-5
                )
    # a replica given nothing returns empty shards
    (_, _, n_none), *empty = scorer.score_shards(request, shards, {}, *parts)
    assert n_none == 0 and empty == [[], []]


@pytest.mark.parametrize(
    "teacher, message",
    [
        ({"engine": "vllm", "mode": "ema"}, "does not take weight pushes"),
        ({"tensor_parallel_size": 2}, "set teacher.engine=vllm"),
        ({"engine": "vllm", "tensor_parallel_size": 2, "num_gpus": 1}, "needs that many GPUs"),
        ({"engine": "tgi"}, "teacher.engine"),
    ],
)
def test_vllm_teacher_settings_that_cannot_work_are_refused(teacher, message):
    with pytest.raises(ValueError, match=message):
        TeacherConfig(path="m", **teacher)


def test_a_vllm_teacher_is_refused_for_signals_it_cannot_return(tiny_pair, tmp_path):
    from opd.cluster.placement import check_devices
    from opd.config.loader import check_resources

    recipe = "recipes/reverse_kl/tiny.yaml"
    common = [
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        "teacher.engine=vllm",
    ]
    check_resources(load_config(recipe, common))  # sampled: served
    topk = load_config(recipe, [*common, "objective.params.estimator=topk"])
    with pytest.raises(ConfigError, match=r"teacher.engine=vllm returns .* signal 'at_ids'"):
        check_resources(topk)
    sharded = load_config(recipe, [*common, "teacher.tensor_parallel_size=2"])
    with pytest.raises(ValueError, match="run.device resolves to cpu: use 1"):
        check_devices(sharded, "cpu")
