"""The teacher-signal seam (issue #16): a signal owns both halves, so adding one touches its
own module and the registry only, and no code outside `opd/signals/` branches on a name."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from opd.config.schema import TeacherConfig
from opd.learner.microbatch import collate
from opd.modeling.logprobs import head_logits
from opd.objectives import TeacherRequest
from opd.samples import Sample
from opd.signals import SIGNALS, signal_of
from opd.signals.at_ids import AtIdsScores
from opd.signals.base import Scores, Signal
from opd.signals.sampled import TokenScores, teacher_forward
from opd.teacher.scorer import TeacherScorer

OPD = Path(__file__).parents[2] / "opd"


# -- a signal added from outside: one class and a registration --------------------------------


@dataclass
class EntropyScores(Scores):
    entropy_BT: Tensor  # the teacher's entropy at each completion position


class Entropy(Signal):
    """A toy signal: the teacher's per-position entropy, and the learner's logits."""

    name = "entropy"
    Scores = EntropyScores

    def score(self, teacher, samples, request):
        parts = teacher_forward(teacher, samples, full_logits=True)
        out = []
        for p in parts:
            lp = torch.log_softmax(p["logits_BTV"].double(), -1)
            out.append(EntropyScores(-(lp.exp() * lp).sum(-1)))
        return out

    def student_inputs(self, model, hidden_BTH, scores):
        return {"student_logits_BTV": head_logits(model, hidden_BTH)}


@pytest.fixture
def entropy_signal(monkeypatch):
    monkeypatch.setitem(SIGNALS, "entropy", Entropy())


def _samples():
    rows = [("tom has 3 apples", [40, 41, 42, 1]), ("pears", [50, 51]), ("x", [60])]
    return [
        Sample(
            i,
            0,
            str(i),
            [{"role": "user", "content": q}],
            [0, 7, 9],
            c,
            [0.0] * len(c),
            "stop",
            0,
            topk_ids=[[3, 4]] * len(c),
        )
        for i, (q, c) in enumerate(rows)
    ]


def test_a_new_signal_is_one_class_and_a_registration(tiny_pair, entropy_signal):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float64)
    tok_path = str(tiny_pair["teacher"])
    from transformers import AutoTokenizer

    scorer = TeacherScorer(
        TeacherConfig(path=tok_path, token_budget=16),
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(tok_path),
    )
    request = TeacherRequest("entropy")  # validated against the registry
    assert request.rollout_topk == 0
    samples = scorer.score(_samples(), request)
    for s in samples:  # each sample's entropies, from one plain forward of its own
        ids = scorer.prompt_ids(s) + s.completion_ids
        start = len(ids) - s.n_tokens
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, start - 1 : -1].double(), -1)
        want = -(lp.exp() * lp).sum(-1)
        assert s.teacher.entropy_BT.shape == (1, s.n_tokens)
        assert torch.allclose(s.teacher.entropy_BT[0], want, atol=1e-10)
    mb = collate(samples)  # the learner's collation needs nothing signal-specific
    assert isinstance(mb.teacher, EntropyScores)
    assert mb.teacher.entropy_BT.shape == (3, 4)
    assert mb.teacher.entropy_BT[1, 2:].abs().sum() == 0  # padding
    assert torch.equal(mb.teacher.entropy_BT[2, :1], samples[2].teacher.entropy_BT[0])


def test_unknown_signals_and_bad_requests_are_refused():
    with pytest.raises(
        ValueError, match="'nope' is unknown; valid: sampled, at_ids, full, aligned"
    ):
        TeacherRequest("nope")
    with pytest.raises(ValueError, match="at_ids.*k >= 1"):
        TeacherRequest("at_ids")
    assert TeacherRequest("at_ids", k=5).rollout_topk == 5
    assert not signal_of(TeacherRequest("aligned")).scores_student_tokens


def test_default_collation_pads_each_field_and_moves_as_a_whole():
    parts = [
        AtIdsScores(torch.ones(1, n), torch.full((1, n, 2), n), torch.full((1, n, 2), -1.0 * n))
        for n in (3, 1)
    ]
    batch = AtIdsScores.collate(parts, T=4)
    assert batch.logprobs_BT.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch.ids_BTK[1].tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]
    assert batch.ids_BTK.dtype == torch.long and batch.logprobs_BTK[0, 2, 1] == -3.0
    moved = TokenScores(torch.zeros(1, 2, dtype=torch.float64)).to(torch.float32)
    assert isinstance(moved, TokenScores) and moved.logprobs_BT.dtype == torch.float32


def test_no_code_outside_the_signals_branches_on_a_signal_name():
    offenders = []
    for path in OPD.rglob("*.py"):
        if path.parts[-2] == "signals":
            continue
        text = path.read_text()
        for pattern in (
            r"\.signal\s*[!=]=",
            r"signal\s+in\s*\(",
            r"hasattr\(\s*objective",
            r"getattr\(\s*objective",
            r"objective\.name\s*[!=]=",
        ):
            offenders += [
                f"{path.relative_to(OPD)}: {m.group(0)}" for m in re.finditer(pattern, text)
            ]
    assert offenders == []


# -- `full` over hidden states: the learner rebuilds the teacher's very logits ----------------


def test_full_scores_as_hidden_states_become_the_same_logits_on_the_learner(tiny_pair):
    from transformers import AutoTokenizer

    from opd.signals.full import Full, FullScores, transport

    path = str(tiny_pair["teacher"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    signal, request = Full(), TeacherRequest("full")
    by = {}
    for how in ("logits", "hidden"):
        cfg = TeacherConfig(path=path, token_budget=16, full_transport=how)
        scorer = TeacherScorer(cfg, model=model, tokenizer=tok)
        by[how] = [s.teacher for s in scorer.score(_samples(), request)]
    assert all(s.hidden_BTH is None and s.logits_BTV is not None for s in by["logits"])
    assert all(s.logits_BTV is None and s.hidden_BTH is not None for s in by["hidden"])
    sent = [
        sum(t.numel() * t.element_size() for t in (s.logits_BTV, s.hidden_BTH) if t is not None)
        for s in (by["logits"][0], by["hidden"][0])
    ]
    assert sent[0] == sent[1] * model.config.vocab_size // model.config.hidden_size  # V/H

    head = signal.prepare_learner(TeacherConfig(path=path, full_transport="hidden"), path, "cpu")
    assert (
        signal.prepare_learner(TeacherConfig(path=path, full_transport="logits"), path, "cpu")
        is None
    )
    want = FullScores.collate(by["logits"], T=4)
    got = signal.learner_view(FullScores.collate(by["hidden"], T=4), head)
    assert torch.equal(got.logprobs_BT, want.logprobs_BT)
    assert torch.allclose(got.logits_BTV, want.logits_BTV, rtol=1e-6, atol=1e-6)
    assert got.hidden_BTH is None

    # auto: hidden states only where the head stays put (a frozen teacher in an HF folder)
    assert transport(TeacherConfig(path=path)) == "hidden"
    assert transport(TeacherConfig(path=path, mode="ema")) == "logits"
    assert transport(TeacherConfig(path=path, gguf_file="m.gguf")) == "logits"
    with pytest.raises(ValueError, match="full_transport=hidden with teacher.mode='live'"):
        TeacherConfig(path=path, mode="live", full_transport="hidden")


def test_a_teacher_folder_without_a_readable_head_is_refused_naming_the_key(tiny_pair, tmp_path):
    import shutil

    from opd.config import ConfigError, check_resources, load_config

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair["teacher"], teacher)
    (teacher / "model.safetensors").unlink()  # weights kept elsewhere, say
    (teacher / "pytorch_model.bin").write_bytes(b"")
    cfg = load_config(
        OPD.parent / "recipes/reverse_kl/tiny.yaml",
        [
            f"student.path={tiny_pair['student']}",
            f"teacher.path={teacher}",
            f"data.train_path={tiny_pair['train']}",
            "objective.params.estimator=full",
        ],
    )
    with pytest.raises(ConfigError, match="teacher.full_transport=auto: the learner reads"):
        check_resources(cfg)
