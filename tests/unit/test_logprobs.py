"""Chunked log-prob kernels and the teacher scorer's alignment against a plain forward pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config.schema import TeacherConfig
from opd.modeling.batching import budget_batches
from opd.modeling.logprobs import final_hidden, gather_positions, token_logprobs
from opd.objectives import TeacherRequest
from opd.samples import Sample
from opd.teacher.scorer import TeacherScorer


@pytest.fixture(scope="module")
def model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float64)


def _reference(model, ids, start):
    """log p of ids[start:] from one plain forward over the whole sequence."""
    logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(start - 1, len(ids) - 1)
    return lp[pos], lp[pos, torch.tensor(ids[start:])]


def test_chunked_token_logprobs_match_full_softmax_with_grads(model):
    ids = torch.tensor([[5, 17, 33, 8, 90, 41, 7]])
    mask = torch.ones_like(ids)
    targets = ids[:, 1:]
    positions = torch.arange(0, ids.shape[1] - 1)[None]
    topk = torch.tensor([[[1, 2, 3]] * targets.shape[1]])

    hidden = gather_positions(final_hidden(model, ids, mask), positions)
    lp, lp_k = token_logprobs(model, hidden, targets, ids_BTK=topk, chunk=4)
    (lp.sum() + lp_k.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    full = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    ref = full.gather(-1, targets[0, :, None])[:, 0]
    ref_k = full.gather(-1, topk[0])
    (ref.sum() + ref_k.sum()).backward()
    assert torch.allclose(lp[0], ref, atol=1e-10)
    assert torch.allclose(lp_k[0], ref_k, atol=1e-10)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-9)
    model.zero_grad()


def test_budget_batches_respect_budget_and_cover_all():
    lengths = [5, 30, 12, 30, 7, 1]
    batches = budget_batches(lengths, budget=40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40


def test_teacher_scores_student_tokens_under_its_own_template(tiny_pair, model):
    template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}=> "
    cfg = TeacherConfig(
        path=str(tiny_pair["teacher"]),
        dtype="float32",
        token_budget=40,
        logprob_chunk_tokens=3,
        chat_template=template,
        full_transport="logits",  # the logits themselves (hidden states: test_signals.py)
    )
    scorer = TeacherScorer(cfg, str(tiny_pair["teacher"]))
    scorer.model = model  # float64 for a tight comparison
    samples = []
    for i, (question, completion) in enumerate(
        [
            ("tom has 3 apples", [40, 41, 42, 1]),
            ("a much longer question about pears and ann", [50, 51]),
            ("x", [60]),
        ]
    ):
        samples.append(
            Sample(
                prompt_index=i,
                sample_index=0,
                prompt_id=str(i),
                messages=[{"role": "user", "content": question}],
                prompt_ids=[0],
                completion_ids=completion,
                logprobs=[0.0] * len(completion),
                finish_reason="stop",
                policy_version=0,
                topk_ids=[[3, 4]] * len(completion),
            )
        )
    scorer.score(samples, TeacherRequest("at_ids", k=2))
    for s in samples:
        prompt = scorer.tokenizer.apply_chat_template(
            s.messages, add_generation_prompt=True, tokenize=False
        )
        assert prompt.startswith("### ") and prompt.endswith("=> ")
        prompt_ids = scorer.prompt_ids(s)
        full, ref = _reference(model, prompt_ids + s.completion_ids, len(prompt_ids))
        assert torch.allclose(s.teacher.logprobs_BT[0].double(), ref, atol=1e-5)
        assert torch.allclose(s.teacher.logprobs_BTK[0].double(), full[:, [3, 4]], atol=1e-5)
        assert s.teacher.ids_BTK[0].tolist() == s.topk_ids  # the ids travel with the scores
        # each sample's scores own their storage: sending one does not send the whole batch
        assert s.teacher.logprobs_BT.untyped_storage().nbytes() == 8 * s.n_tokens
    scorer.score(samples[:1], TeacherRequest("full"))
    full, _ = _reference(
        model,
        scorer.prompt_ids(samples[0]) + samples[0].completion_ids,
        len(scorer.prompt_ids(samples[0])),
    )
    logits = samples[0].teacher.logits_BTV[0]
    assert logits.dtype == model.dtype  # the head's own output, not upcast log-probs
    assert torch.allclose(torch.log_softmax(logits.double(), -1), full, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_sampled_token_logprobs_are_at_the_sampling_temperature(model, fused):
    """The learner's log-probs of the sampled tokens are those of softmax(logits / T), what
    the rollout engine sampled from and reports; log-probs at other ids stay at T = 1."""
    tau = 0.7
    ids = torch.tensor([[5, 17, 33, 8, 90, 41, 7]])
    targets, positions = ids[:, 1:], torch.arange(0, ids.shape[1] - 1)[None]
    mask = torch.ones_like(targets, dtype=torch.float64)
    topk = torch.tensor([[[1, 2, 3]] * targets.shape[1]])
    hidden = gather_positions(final_hidden(model, ids, torch.ones_like(ids)), positions)
    lp, lp_k = token_logprobs(
        model,
        hidden,
        targets,
        ids_BTK=None if fused else topk,
        chunk=4,
        mask_BT=mask,
        cache_bytes=2**30 if fused else 0,
        temperature=tau,
    )
    lp.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(ids).logits[0, :-1].double()
    at = targets[0, :, None]
    ref = torch.log_softmax(logits / tau, -1).gather(-1, at)[:, 0]
    assert not torch.allclose(ref, torch.log_softmax(logits, -1).gather(-1, at)[:, 0])
    ref.sum().backward()
    assert torch.allclose(lp[0].double(), ref.detach(), atol=1e-6)
    if not fused:
        at_t1 = torch.log_softmax(logits, -1).gather(-1, topk[0])
        assert torch.allclose(lp_k[0], at_t1.detach(), atol=1e-8)
    tol = 1e-4 if fused else 1e-8  # HeadLogProb keeps fp32 log-normalizers
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=tol), (g - p.grad).abs().max()
    model.zero_grad()
