"""Where a recipe's model comes from: an HF folder, a GGUF file, or a `registry:` name.

Registry names are real small models shipped inside packages on the package index; they are
converted to HF folders once and cached (`opd.models.registry`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

REGISTRY_PREFIX = "registry:"


def _smollm2() -> Path:
    from opd.models.registry import prepare_smollm2

    return prepare_smollm2()


def _smollm2_keep3() -> Path:
    from opd.models.registry import prepare_layer_dropped, prepare_smollm2

    return prepare_layer_dropped(prepare_smollm2(), keep_every=3)


def _gemma3() -> Path:
    from opd.models.gemma import prepare_gemma3

    return prepare_gemma3()


def _tiny(role: str) -> Callable[[], Path]:
    """Tiny models built on the fly (tests, CPU smoke runs): a trained teacher, a random student."""

    def prepare() -> Path:
        from opd.cache import build_folder, cache_root
        from opd.models.tiny import build_pair

        return build_folder(cache_root() / "models" / "tiny-v1", build_pair) / role

    return prepare


# name -> (prepare function, facts known without preparing)
REGISTRY_MODELS: dict[str, tuple[Callable[[], Path], dict]] = {
    "tiny-teacher": (_tiny("teacher"), {"vocab_size": 384, "num_hidden_layers": 2}),
    "tiny-student": (_tiny("student"), {"vocab_size": 384, "num_hidden_layers": 2}),
    "smollm2-135m-instruct": (_smollm2, {"vocab_size": 49152, "num_hidden_layers": 30}),
    "smollm2-135m-instruct-keep3": (_smollm2_keep3, {"vocab_size": 49152, "num_hidden_layers": 10}),
    "gemma3-270m": (_gemma3, {"vocab_size": 262144, "num_hidden_layers": 18}),
}


def _registry_entry(path: str) -> tuple[Callable[[], Path], dict]:
    name = path[len(REGISTRY_PREFIX) :]
    if name not in REGISTRY_MODELS:
        raise ValueError(f"unknown model {path!r}; registry models: {', '.join(REGISTRY_MODELS)}")
    return REGISTRY_MODELS[name]


def resolve_model(path: str) -> Path:
    """A local HF folder (or GGUF file) for `path`, preparing registry models on first use."""
    if path.startswith(REGISTRY_PREFIX):
        prepare, _ = _registry_entry(path)
        return prepare()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    return p


def describe_model(path: str, gguf_file: str | None = None) -> dict:
    """Facts about a model that validation needs, without loading weights."""
    if path.startswith(REGISTRY_PREFIX):
        return dict(_registry_entry(path)[1])
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if gguf_file or p.suffix == ".gguf":
        gguf = p / gguf_file if gguf_file else p
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        return {"format": "gguf"}
    config = p / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{p} has no config.json: not a transformers model folder")
    data = json.loads(config.read_text())
    text_cfg = data.get("text_config", data)
    return {k: text_cfg[k] for k in ("vocab_size", "num_hidden_layers") if k in text_cfg}
