"""The DeepSpeed learner in-process (world size 1, gloo): a step moves the weights by the
objective's gradient, gradient accumulation equals one big batch, and a non-finite gradient
skips the update on every ZeRO stage and is counted."""

import pytest
import torch

from opd.cluster.placement import free_port
from opd.config.schema import LearnerConfig, ObjectiveConfig
from opd.learner.worker import Learner
from opd.samples import Sample
from opd.signals.aligned import AlignedScores
from opd.signals.sampled import TokenScores


def _samples(n, teacher_value=-1.0):
    out = []
    for i in range(n):
        completion = [40 + i, 41, 42]
        out.append(
            Sample(
                prompt_index=i,
                sample_index=0,
                prompt_id=str(i),
                messages=[],
                prompt_ids=[2, 30 + i, 3],
                completion_ids=completion,
                logprobs=[-5.0, -4.0, -6.0],
                finish_reason="stop",
                policy_version=0,
                teacher=TokenScores(torch.full((1, 3), teacher_value)),
            )
        )
    return out


def _learner(student, stage, micro):
    cfg = LearnerConfig(zero_stage=stage, lr=1e-2, micro_batch_size=micro, grad_clip=1e9)
    return Learner(
        0,
        1,
        "127.0.0.1",
        free_port(),
        str(student),
        cfg,
        ObjectiveConfig(),
        total_steps=10,
        grad_accum_steps=4 // micro,
        seed=0,
        device="cpu",
    )


def _params(learner):
    return {k: v.detach().clone() for k, v in learner.state_dict_for_export("float32").items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_step_updates_and_nonfinite_skips(tiny_pair, stage):
    learner = _learner(tiny_pair["student"], stage, micro=2)
    before = _params(learner)
    m = learner.train_step(12, _samples(4))
    after = _params(learner)
    assert m["train/skipped_steps"] == 0
    assert any(not torch.equal(before[k], after[k]) for k in before)

    bad = _samples(4)
    bad[3].teacher.logprobs_BT[0, 1] = float("nan")
    m = learner.train_step(12, bad)
    assert m["train/skipped_steps"] == 1
    unchanged = _params(learner)
    assert all(torch.equal(after[k], unchanged[k]) for k in after)
    learner.train_step(12, _samples(4))  # and training goes on, unpoisoned
    later = _params(learner)
    assert all(torch.isfinite(v).all() for v in later.values())
    assert any(not torch.equal(after[k], v) for k, v in later.items())


def _varied_samples():
    """Four samples whose sampler and teacher log-probs differ per sample and per token, with
    advantages of both signs: a gradient that pairs a score with the wrong token shows."""
    out = _samples(4)
    delta = [[0.7, -0.4, 1.1], [-0.9, 0.3, -0.2], [0.5, 0.8, -1.2], [-0.6, -0.1, 0.9]]
    for i, s in enumerate(out):
        s.logprobs = [-5.0 + 0.5 * i, -4.0 - 0.25 * i, -6.0 + 0.1 * i]
        s.teacher = TokenScores((torch.tensor(s.logprobs) + torch.tensor(delta[i]))[None])
    return out


def _reference_grads(student, samples, normalizer):
    """Per-parameter gradients of the sampled reverse-KL loss, normalized by all tokens, on a
    plain transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    total = 0.0
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(s.prompt_ids)
        lp_c = lp[torch.arange(n - 1, ids.shape[1] - 1), torch.tensor(s.completion_ids)]
        old = torch.tensor(s.logprobs)
        advantage = s.teacher.logprobs_BT[0] - old
        total = total - (torch.exp(lp_c - old) * advantage).sum()
    (total / normalizer).backward()
    return {k: p.grad for k, p in model.named_parameters()}


def _record_grads(model):
    """{name: gradient} of every parameter, summed over the backward passes to come (as the
    engine accumulates micro-batches), read by tensor hooks before DeepSpeed touches it."""
    got = {}

    def keep(name):
        return lambda g: got.__setitem__(name, got.get(name, 0) + g.detach().clone())

    for name, p in model.named_parameters():
        p.register_hook(keep(name))
    return got


def test_loss_normalization_is_independent_of_micro_batching(tiny_pair):
    """One micro-batch of 4 or four of 1: every parameter's gradient is the reference's, and
    the optimizer steps along it (Adam's first step moves a weight by about -lr sign(g))."""
    want = _reference_grads(tiny_pair["student"], _varied_samples(), 12)
    want_norm = torch.sqrt(sum(g.pow(2).sum() for g in want.values())).item()
    for micro in (4, 1):
        learner = _learner(tiny_pair["student"], 2, micro=micro)
        got = _record_grads(learner.model)
        before = _params(learner)
        m = learner.train_step(12, _varied_samples())
        assert m["train/grad_norm"] == pytest.approx(want_norm, rel=1e-4), micro
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert torch.allclose(got[name], g, rtol=1e-3, atol=1e-4 * g.abs().max()), name
        after = _params(learner)
        for name, g in want.items():
            steps = (after[name] - before[name])[g.abs() > 1e-4]
            assert steps.numel() > 0, name
            assert torch.allclose(steps, -1e-2 * g[g.abs() > 1e-4].sign(), rtol=1e-2), name


def _aligned_samples(n):
    """Samples with the teacher's aligned (simct) payload: S = 16 shared tokens, segments
    (0,1,0,1) 1:1 and (1,3,1,2) a span of 2 student tokens over 1 teacher token."""
    g = torch.Generator().manual_seed(0)
    out = _samples(n)
    for s in out:
        s.teacher = AlignedScores(
            batch_K=torch.zeros(2, dtype=torch.long),
            student_start_K=torch.tensor([0, 1]),
            student_len_K=torch.tensor([1, 2]),
            teacher_len_K=torch.tensor([1, 1]),
            teacher_shared_KS=torch.randn(2, 16, generator=g),
            teacher_span_K=torch.randn(2, generator=g) * torch.tensor([0.0, 1.0]),
            student_vocab_S=torch.arange(40, 56),
        )
    return out


@pytest.mark.parametrize("objective", ["reverse_kl", "simct"])
def test_zero3_matches_zero2_with_gradient_accumulation(tiny_pair, objective):
    """Two micro-batches per step: ZeRO-3 must accumulate both (it once kept only the last),
    and simct's on-demand LM-head reads must see ZeRO-3's partitioned weight whole."""
    samples = _aligned_samples if objective == "simct" else _samples
    results, moved = [], []
    for stage in (2, 3):
        cfg = LearnerConfig(zero_stage=stage, lr=1e-2, micro_batch_size=2, grad_clip=1e9)
        learner = Learner(
            0,
            1,
            "127.0.0.1",
            free_port(),
            str(tiny_pair["student"]),
            cfg,
            ObjectiveConfig(name=objective),
            total_steps=10,
            grad_accum_steps=2,
            seed=0,
            device="cpu",
        )
        before = _params(learner)
        results.append(learner.train_step(12, samples(4)))
        moved.append({k: v - before[k] for k, v in _params(learner).items()})
        if objective == "simct":
            evaluated = learner.evaluate(samples(2))
            assert evaluated["tokens"] == 6 and evaluated["simct/span_tokens"] == 2 * 2
            assert results[-1]["simct/mean_span_len"] == 2.0
    two, three = results
    assert three["train/loss"] == pytest.approx(two["train/loss"], rel=1e-5)
    assert three["train/grad_norm"] == pytest.approx(two["train/grad_norm"], rel=1e-4)
    # Adam's first step moves each weight by about lr x sign(gradient): the same gradient
    # moves the same weights the same way.
    assert moved[0]["lm_head.weight"].abs().max() > 1e-3
    for k in moved[0]:
        flipped = ((moved[0][k] - moved[1][k]).abs() > 1e-3).float().mean().item()
        assert flipped == 0.0, (k, flipped)
