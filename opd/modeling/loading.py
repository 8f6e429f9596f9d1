"""Loading causal LMs the way every role does: the recipe's dtype names, one loader."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, gguf_file: str | None, dtype: torch.dtype, device):
    """(model in eval mode on `device`, tokenizer) from an HF folder (or a GGUF file in it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    model.eval()
    return model, tokenizer


class OutputHead(torch.nn.Module):
    """A causal LM's output layer alone (and its config, for the output transforms), for
    `opd.modeling.logprobs.head_logits`: the teacher's logits from its hidden states."""

    def __init__(self, config, head: torch.nn.Linear) -> None:
        super().__init__()
        self.config, self.head = config, head

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def load_output_head(path: str, dtype: torch.dtype, device) -> OutputHead:
    """The LM head of the model in the HF folder `path`, read from its safetensors without
    building the model (a tied head is the input embedding's matrix)."""
    from safetensors import safe_open

    config, (in_features, out_features), wanted = _head_tensors(path)
    head = torch.nn.Linear(in_features, out_features, bias="bias" in wanted)
    state = {}
    for key, (name, file) in wanted.items():
        with safe_open(str(file), framework="pt") as f:
            state[key] = f.get_tensor(name)
    head.load_state_dict(state)
    return OutputHead(config, head.to(device=device, dtype=dtype)).eval()


def check_output_head(path: str) -> None:
    """Raise (naming the folder and tensor) where `load_output_head` could not read the head."""
    _head_tensors(path)


def _head_tensors(path: str):
    """(config, (in, out) features, {"weight"|"bias": (tensor name, safetensors file)}) of the
    LM head of the model in `path`, found on a skeleton built on the meta device."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out = skeleton.get_output_embeddings()
    names: dict[int, str] = {}
    for name, p in skeleton.named_parameters():  # a tied weight is listed once, first name
        names.setdefault(id(p), name)
    params = {"weight": out.weight}
    if getattr(out, "bias", None) is not None:
        params["bias"] = out.bias
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    wanted = {}
    for key, p in params.items():
        name = names[id(p)]
        file = folder / files.get(name, "model.safetensors")
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no safetensors file {file.name} for {name}")
        with safe_open(str(file), framework="pt") as f:
            if name not in f.keys():
                raise KeyError(f"{path}: no tensor {name!r} (the LM head) in {file.name}")
        wanted[key] = (name, file)
    return config, (out.in_features, out.out_features), wanted
