"""LoRA students through peft: the learner trains adapters on a frozen model.

The learner wraps its transformers model with `peft.get_peft_model` and keeps using the
wrapped transformers model (`PeftModel.get_base_model()`), whose adapted linear layers now add
their low-rank update; only the adapters are trainable. What leaves the learner:

- a weight sync writes the adapters in peft's folder format (`adapter_config.json` +
  `adapter_model.safetensors`), which vLLM serves as a LoRA adapter (`opd.rollout.worker`):
  a push moves r x (in + out) numbers per adapted layer instead of every weight;
- the exported student is the merged model (each base weight plus its adapter's delta, under
  the transformers names), beside the adapter folder.

peft initialises B to zero, so at version 0 the adapted model equals the base model the
rollout engines load: they need no adapter until the first push.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd.config.schema import LoraConfig

ADAPTER = "default"  # peft's adapter name


def apply_lora(model, cfg: LoraConfig):
    """`model` with rank-`cfg.rank` adapters (model frozen, adapters trainable): the PeftModel."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ValueError(f"learner.lora.target_modules={list(targets)}: {e}") from e


def adapter_state(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's saved names, on the host in `dtype`."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER)
    return {k: v.detach().to(dtype).cpu().contiguous() for k, v in state.items()}


def save_adapter(peft_model, path: str | Path, dtype: torch.dtype) -> int:
    """Write the adapter folder (peft's format, what vLLM loads); returns the weight bytes.
    The weights file is renamed into place after it is complete."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = adapter_state(peft_model, dtype)
    peft_model.peft_config[ADAPTER].save_pretrained(str(path))
    tmp = path / "adapter_model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.rename(path / "adapter_model.safetensors")
    return sum(t.numel() * t.element_size() for t in state.values())


def merged_weights(model):
    """(transformers name, weight) of the adapted model `model` (the PeftModel's base model)
    with each adapter merged into its base weight; the adapters' own parameters left out."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        weight = p.detach()
        module = deltas.get(name)
        if module is not None:
            weight = weight + module.get_delta_weight(ADAPTER).to(weight.dtype)
        yield name.replace(".base_layer.", "."), weight
