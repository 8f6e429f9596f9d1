"""The text half of SimCT (`opd.objectives.simct`): tokens as bytes, the shared vocabulary, and
the alignment of two tokenizations of one completion into segments.

**Bytes, not strings** (ours): a byte-level BPE splits a multi-byte character over tokens
whose individual decodes are U+FFFD, so per-token decoded strings neither concatenate to the
text nor compare correctly. The alignment therefore measures and compares UTF-8 *bytes*:
`token_bytes` gives each token's exact bytes (byte-level BPE via the GPT-2 byte table;
SentencePiece-style via "▁" -> " " and `<0xHH>` byte fallback), and `align_segments` also
accepts `str` pieces (encoded as UTF-8), which is exact whenever no token splits a character.
Every segment then holds the same bytes on both sides, and the segments concatenate to a
prefix of the completion's bytes.

The two segmentations, and how they compare with the authors' code: docs/simct.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

SEGMENTATIONS = ("authors", "fine")
Segment = tuple[int, int, int, int]  # half-open (student_start, student_end, teacher_start, _end)


# --- tokens as bytes, shared vocabulary ------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in str(backend.decoder)


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """Each token's exact UTF-8 bytes; special tokens give their literal text."""
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    table = _byte_level_decoder()
    out = []
    for tid, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if tid in special:
            out.append(tok.encode())
        elif byte_level:
            out.append(
                bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode()
            )
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(tok.replace("▁", " ").encode())
    return out


def _normalize(token: str) -> str:
    return token.replace("Ġ", "▁")


def shared_vocab(student_tokenizer, teacher_tokenizer) -> tuple[Tensor, Tensor]:
    """(student_ids_S, teacher_ids_S): tokens equal after "Ġ" -> "▁", plus EOS <-> EOS."""
    teacher = {}
    for tok, tid in sorted(teacher_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        teacher.setdefault(_normalize(tok), tid)
    pairs: dict[int, int] = {}
    taken: set[int] = set()
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if s_eos is not None and t_eos is not None:
        pairs[s_eos], taken = t_eos, {t_eos}
    for tok, sid in sorted(student_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        tid = teacher.get(_normalize(tok))
        if tid is not None and sid not in pairs and tid not in taken:
            pairs[sid] = tid
            taken.add(tid)
    student_ids = sorted(pairs)
    return (
        torch.tensor(student_ids, dtype=torch.long),
        torch.tensor([pairs[s] for s in student_ids], dtype=torch.long),
    )


# --- alignment ------------------------------------------------------------------------------


def _as_bytes(pieces: Sequence[str | bytes], eos: int | None) -> list[bytes]:
    out = [p.encode() if isinstance(p, str) else bytes(p) for p in pieces]
    if eos is not None:
        out[eos] = b""  # EOS carries no text, whatever its decoded form
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(k for k in range(n) if a[k] != b[k])


def align_segments(
    student_pieces: Sequence[str | bytes],
    teacher_pieces: Sequence[str | bytes],
    student_eos: int | None = None,
    teacher_eos: int | None = None,
    segmentation: str = "authors",
) -> list[Segment]:
    """Half-open (student_start, student_end, teacher_start, teacher_end) segments.

    Walk both sides keeping the accumulated text. When the accumulated texts are equal and
    the next tokens are identical (or both EOS), record a boundary and advance both;
    otherwise advance the side whose text is shorter (both if equal but the tokens differ).

    - `authors`: a segment runs from after one boundary through the next: a lone identical
      token (1:1), or the unmatched run before a boundary together with the identical token
      that closes it (a span). A point where the texts merely meet is not a cut.
    - `fine`: the same boundaries, each a 1:1 segment of its own, and an unmatched run cut
      into spans wherever the two texts meet (the shortest runs both sides realize as the
      same text). Each `authors` segment is a union of consecutive `fine` ones.

    Tokens after the last boundary are dropped, and so is everything past the texts' longest
    common prefix.
    """
    check_segmentation(segmentation)
    s, t = _as_bytes(student_pieces, student_eos), _as_bytes(teacher_pieces, teacher_eos)
    limit = _common_prefix(b"".join(s), b"".join(t))
    segments: list[Segment] = []
    i = j = s0 = t0 = acc_s = acc_t = closed = 0
    while True:
        if acc_s == acc_t:
            if acc_s > limit:  # the same length, another text: no boundary from here on
                break
            if segmentation == "fine" and (i, j) != (s0, t0):  # a span's texts meet
                segments.append((s0, i, t0, j))
                s0, t0 = i, j
            if i == len(s) or j == len(t):
                break
            both_eos = i == student_eos and j == teacher_eos
            neither_eos = i != student_eos and j != teacher_eos
            identical = both_eos or (neither_eos and s[i] == t[j])
            acc_s, acc_t, i, j = acc_s + len(s[i]), acc_t + len(t[j]), i + 1, j + 1
            if identical:
                segments.append((s0, i, t0, j))
                s0, t0, closed = i, j, len(segments)
        elif acc_s < acc_t:
            if i == len(s):
                break
            acc_s, i = acc_s + len(s[i]), i + 1
        else:
            if j == len(t):
                break
            acc_t, j = acc_t + len(t[j]), j + 1
    return segments[:closed]  # `fine` spans after the last boundary are dropped too


def check_segmentation(segmentation: str) -> None:
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"segmentation={segmentation!r}; valid: {', '.join(SEGMENTATIONS)}")


def eos_index(ids: Sequence[int], eos_id: int | None) -> int | None:
    """The index of a final EOS token, or None."""
    return len(ids) - 1 if ids and eos_id is not None and ids[-1] == eos_id else None


def retokenize(student_tokenizer, teacher_tokenizer, student_ids: Sequence[int]) -> list[int]:
    """The teacher's tokenization of a student completion, with the teacher's EOS if it ended."""
    eos = eos_index(student_ids, student_tokenizer.eos_token_id)
    body = list(student_ids[:eos] if eos is not None else student_ids)
    text = b"".join(token_bytes(student_tokenizer, body)).decode("utf-8", errors="replace")
    ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [teacher_tokenizer.eos_token_id] if eos is not None else ids


def align_ids(
    student_tokenizer,
    teacher_tokenizer,
    student_ids: Sequence[int],
    teacher_ids: Sequence[int],
    segmentation: str = "authors",
) -> list[Segment]:
    """`align_segments` on token ids, with each side's final EOS recognized."""
    return align_segments(
        token_bytes(student_tokenizer, student_ids),
        token_bytes(teacher_tokenizer, teacher_ids),
        eos_index(student_ids, student_tokenizer.eos_token_id),
        eos_index(teacher_ids, teacher_tokenizer.eos_token_id),
        segmentation,
    )
