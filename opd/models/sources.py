"""Where a recipe's model comes from: an HF folder, a GGUF file, or a `registry:` name.

Registry names are real small models shipped inside packages on the package index; they are
converted to HF folders once and cached (`opd.models.registry`).
"""

from __future__ import annotations

import json
import re
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# what a model folder needs from a hub repository (not its other formats' weights)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def hub_folder(path: str, local_only: bool = False) -> Path | None:
    """A Hugging Face hub id (`org/name`, optionally `@revision`) that is no local path, as
    the folder of its snapshot in the standard hub cache (`HF_HOME` / `HF_HUB_CACHE`),
    downloaded unless cached (`local_only`, or `HF_HUB_OFFLINE=1`: the cache only). None:
    `path` is not a hub id."""
    if not HUB_ID.fullmatch(path) or Path(path.split("/")[0]).expanduser().exists():
        return None  # a local path (or one under a local folder, e.g. runs/x)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    repo, _, revision = path.partition("@")
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision or None,
                allow_patterns=HUB_FILES,
                local_files_only=local_only,
            )
        )
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"model not found: {path} is neither a local path nor in the Hugging Face cache, "
            "and the hub was not reached (offline, or HF_HUB_OFFLINE=1): download it where "
            f"there is a network (hf download {repo}) into the cache HF_HOME points to"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"model not found: no hub repository {repo}") from e


def resolve_model(path: str) -> Path:
    """A local HF folder (or GGUF file) for `path`: a folder or file, a registry model
    (prepared on first use) or a hub id (`hub_folder`)."""
    if path.startswith(REGISTRY_PREFIX):
        prepare, _ = _registry_entry(path)
        return prepare()
    hub = hub_folder(path)
    if hub is not None:
        return hub
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    return p


def describe_model(path: str, gguf_file: str | None = None) -> dict:
    """Facts about a model that validation needs, without loading weights (a hub id is read
    from the cache if it is there, never downloaded here)."""
    if path.startswith(REGISTRY_PREFIX):
        return dict(_registry_entry(path)[1])
    try:
        hub = hub_folder(path, local_only=True)
    except FileNotFoundError:
        return {"source": "hub, not cached: downloaded when the run starts"}
    p = hub if hub is not None else Path(path).expanduser()
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
