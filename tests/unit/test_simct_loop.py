"""simct in the loop: the teacher scorer's aligned scores (its own tokenization, plain-text
prompt, token-budget batches) + the learner's on-demand student logits give the same loss,
metrics and gradients as a dense reference built from both models' full logits, for every
mode and segmentation."""

import pytest
import torch

from opd.config.schema import TeacherConfig
from opd.data.prompts import render_ids
from opd.learner.microbatch import collate
from opd.modeling.logprobs import final_hidden, gather_positions
from opd.objectives import build_objective
from opd.objectives.base import LossInputs, TeacherRequest
from opd.objectives.simct import build_simct_batch
from opd.samples import Sample
from opd.signals import SIGNALS
from opd.signals.aligned import AlignedScores, SegmentIndex, pair
from opd.signals.aligned_pair import PROBE_TEXT, TokenizerPair
from opd.signals.alignment import SEGMENTATIONS, shared_vocab
from opd.teacher.scorer import TeacherScorer

TEXTS = ["the answer is 42", "apples and pears 7 + 5 = 12", "", "Tom has 3 cats", "Ann: 12 pears?"]


def _teacher_tokenizer():
    from opd.models.tiny import synthetic_corpus, train_bpe

    texts = synthetic_corpus(300, seed=5)
    return train_bpe(texts, 500, ["<s>", "</s>"], eos_token="</s>", bos_token="<s>")


def _model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from opd.models.tiny import build_tokenizer

    s_tok = build_tokenizer(tmp_path_factory.mktemp("student_tok"))
    t_tok = _teacher_tokenizer()
    assert t_tok.chat_template is None  # the scorer renders prompts as plain text
    student, teacher = _model(len(s_tok), 0), _model(len(t_tok), 1)
    cfg = TeacherConfig(path="-", token_budget=64)
    scorer = TeacherScorer(cfg, model=teacher, tokenizer=t_tok)
    scorer.signal_state["pair"] = TokenizerPair(s_tok, t_tok, *shared_vocab(s_tok, t_tok))
    samples = []
    for i, text in enumerate(TEXTS):
        messages = [{"role": "user", "content": f"question {i}: what is {i} + {i}?"}]
        ids = s_tok(text, add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
        prompt = render_ids(s_tok, messages)
        samples.append(Sample(i, 0, str(i), messages, prompt, ids, [0.0] * len(ids), "stop", 0))
    return s_tok, t_tok, student, teacher, scorer, samples


def _dense_reference(setup, samples, params):
    """Both sides' full logits along their own tokenizations, then `build_simct_batch` on the
    fine segments (the objective merges them for `segmentation: authors`)."""
    s_tok, t_tok, student, teacher, scorer, _ = setup
    tokens = pair(scorer)
    s_rows, t_rows, s_logits, t_logits, aligns = [], [], [], [], []
    for s in samples:
        t_ids = tokens.retokenize(s.completion_ids)
        aligns.append(tokens.align(s.completion_ids, t_ids))
        for model, prompt, ids, rows, out in (
            (student, s.prompt_ids, s.completion_ids, s_rows, s_logits),
            (teacher, scorer.prompt_ids(s), t_ids, t_rows, t_logits),
        ):
            seq = torch.tensor([prompt + ids])
            logits = model(input_ids=seq).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ids)]
            rows.append(torch.tensor(ids))
            out.append(logits)
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    batch = build_simct_batch(
        pad(s_logits),
        pad(s_rows),
        pad(t_logits).detach(),
        pad(t_rows),
        SegmentIndex.from_alignments(aligns),
        (tokens.student_vocab, tokens.teacher_vocab),
        sum(s.n_tokens for s in samples),
    )
    return build_objective("simct", params).batch_loss(batch)


PARAMS = [
    {},  # simct on the authors' segments
    {"segmentation": "fine"},
    {"mode": "shared_only"},
    {"mode": "shared_only", "segmentation": "fine"},
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "-".join(p.values()) or "default")
def test_scorer_and_learner_halves_match_dense_reference(setup, params):
    s_tok, t_tok, student, teacher, scorer, samples = setup
    objective = build_objective("simct", params)
    assert objective.teacher_request() == TeacherRequest("aligned")
    scored = scorer.score([_copy(s) for s in samples], objective.teacher_request())
    assert all(isinstance(s.teacher, AlignedScores) for s in scored)
    mb = collate(scored)
    hidden = gather_positions(
        final_hidden(student, mb.input_ids_BL, mb.attention_mask_BL), mb.positions_BT
    )
    x = LossInputs(  # as the learner builds them: the signal says what the student adds
        logprobs_BT=torch.zeros_like(mb.mask_BT),
        old_logprobs_BT=mb.old_logprobs_BT,
        mask_BT=mb.mask_BT,
        teacher=mb.teacher,
        targets_BT=mb.targets_BT,
        **SIGNALS["aligned"].student_inputs(student, hidden, mb.teacher),
    )
    student.zero_grad()
    out = objective(x)
    out.loss_sum.backward()
    got_grad = {n: p.grad.clone() for n, p in student.named_parameters()}

    student.zero_grad()
    want = _dense_reference(setup, samples, params)
    want.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(want.loss_sum.item(), rel=1e-9)
    assert out.loss_sum.item() > 0
    for k, v in want.metrics.items():
        assert out.metrics[k].item() == pytest.approx(v.item(), rel=1e-9, abs=1e-12), k
    for n, p in student.named_parameters():
        assert torch.allclose(got_grad[n], p.grad, rtol=1e-7, atol=1e-12), n
    assert teacher.lm_head.weight.grad is None


def test_segmentations_differ_where_a_span_meets_an_identical_token(setup):
    """The completions hold spans closed by an identical token: `authors` folds that token into
    the span, `fine` supervises it on its own, so the two losses and metrics differ."""
    samples = setup[-1]
    out = {seg: _dense_reference(setup, samples, {"segmentation": seg}) for seg in SEGMENTATIONS}
    a, f = out["authors"].metrics, out["fine"].metrics
    assert a["simct/matched_tokens"] == f["simct/matched_tokens"] == f["simct/one_to_one_tokens"]
    assert a["simct/one_to_one_tokens"] < f["simct/one_to_one_tokens"]
    assert a["simct/span_tokens"] > f["simct/span_tokens"] > 0
    assert a["simct/dropped_tokens"] == f["simct/dropped_tokens"] == 0
    assert out["authors"].loss_sum.item() != pytest.approx(out["fine"].loss_sum.item())


def test_plain_prompt_and_pair_report(setup):
    s_tok, t_tok, _, _, scorer, samples = setup
    ids = scorer.prompt_ids(samples[1])
    assert ids[0] == t_tok.bos_token_id
    assert t_tok.decode(ids[1:]) == "Question: question 1: what is 1 + 1?\nAnswer:\n"
    report = pair(scorer).report(PROBE_TEXT, uses_chat_template=False)
    assert report["shared_vocab"] == len(pair(scorer).student_vocab) > 0
    assert 0 < report["probe_one_to_one_fraction"] <= report["probe_supervised_fraction"] <= 1
    assert any("plain text" in w for w in report["warnings"])
    lines = scorer.signal_report(TeacherRequest("aligned"))  # what `opd train` prints
    assert f"shared vocabulary {report['shared_vocab']} tokens" in lines[0]
    assert lines[1:] == [f"warning: {w}" for w in report["warnings"]]
    assert scorer.signal_report(TeacherRequest("sampled")) == []


def test_objective_registry_and_metrics_finalize():
    objective = build_objective("simct", {})
    m = objective.finalize_metrics(
        {"simct/spans": 0.5, "simct/span_tokens": 1.5, "simct/teacher_span_tokens": 1.0}
    )
    assert m["simct/mean_span_len"] == 3.0 and m["simct/mean_teacher_span_len"] == 2.0
    with pytest.raises(ValueError, match="mode"):
        build_objective("simct", {"mode": "spans"})
    with pytest.raises(ValueError, match="segmentation=.*valid: authors, fine"):
        build_objective("simct", {"segmentation": "paper"})
    with pytest.raises(ValueError, match="segmentaton"):  # a misspelled key is named
        build_objective("simct", {"segmentaton": "fine"})


def _copy(s: Sample) -> Sample:
    return Sample(**{**s.__dict__, "teacher": {}})
