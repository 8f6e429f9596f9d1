"""LoRA students (`learner.lora`): the recipe checks, the adapter folder, the merged export.

The adapted model is checked against peft's own merge (`merge_and_unload`) and against the
adapter loaded back by peft onto the base model; training and the vLLM side run end to end in
tests/e2e/test_lora_train.py.
"""

from pathlib import Path

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.config.schema import LoraConfig
from opd.learner.lora import apply_lora, merged_weights, save_adapter
from opd.rollout.worker import lora_engine_args
from opd.sync.weights import DirWeightSync, make_weight_sync

RECIPE = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"


def _adapted(tiny_pair, **lora):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    peft_model = apply_lora(base, LoraConfig(rank=4, **lora))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters something to add
            torch.nn.init.normal_(p, std=0.05)
    return peft_model


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learner.lora.rank=-1"], "learner.lora.rank=-1 must lie in"),
        (["learner.lora.rank=600"], "learner.lora.rank=600 must lie in"),
        (["learner.lora.rank=8", "learner.lora.dropout=1.0"], "learner.lora.dropout=1.0"),
        (["learner.lora.rank=8", "learner.lora.target_modules=[]"], "target_modules is empty"),
        (["learner.lora.rank=8", "learner.zero_stage=3"], "zero_stage=3"),
        (["learner.lora.rank=8", "rollout.weight_sync=nccl"], "syncs only the adapters"),
        (
            ["learner.lora.rank=8", "teacher.mode=ema", "teacher.path=${student.path}"],
            "teacher.mode='ema'",
        ),
        (["learner.lora.rank=8", "student.gguf_file=m.gguf"], "unset student.gguf_file"),
    ],
)
def test_recipe_checks_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, overrides)


def test_lora_recipe_loads_and_picks_the_folder_sync():
    cfg = load_config(RECIPE, ["learner.lora.rank=16", "learner.lora.target_modules=[q_proj]"])
    assert cfg.learner.lora.enabled and cfg.learner.lora.target_modules == ["q_proj"]
    pair = (object(), object())
    # on GPUs `auto` would pick IPC/NCCL, which move whole weights: a LoRA run writes adapters
    sync = make_weight_sync("auto", "cuda", *pair, "bfloat16", colocated=True, lora=True)
    assert isinstance(sync, DirWeightSync)
    sync.close()


def test_vllm_rank_is_the_smallest_that_holds_the_adapter():
    assert lora_engine_args(8)["max_lora_rank"] == 8
    assert lora_engine_args(12)["max_lora_rank"] == 16
    assert lora_engine_args(300)["max_lora_rank"] == 320
    assert lora_engine_args(1) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 1}


def test_only_adapters_train_and_a_missing_target_is_named(tiny_pair):
    peft_model = _adapted(tiny_pair)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # "all-linear" adapts every decoder linear layer (7 per layer), not the LM head
    layers = peft_model.get_base_model().config.num_hidden_layers
    assert len(trainable) == 2 * 7 * layers
    with pytest.raises(ValueError, match=r"learner.lora.target_modules=\['no_such_proj'\]"):
        _adapted(tiny_pair, target_modules=["no_such_proj"])


def test_merged_weights_equal_peft_merge(tiny_pair):
    peft_model = _adapted(tiny_pair)
    ours = {k: v.clone() for k, v in merged_weights(peft_model.get_base_model())}
    reference = peft_model.merge_and_unload().state_dict()
    assert set(ours) <= set(reference)
    assert set(reference) - set(ours) <= {"lm_head.weight"}  # tied to the embeddings
    for name, weight in ours.items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-6)
    # the adapters did move the weights
    base = _adapted(tiny_pair).get_base_model()
    q = "model.layers.0.self_attn.q_proj"
    base_q = dict(base.named_parameters())[f"{q}.base_layer.weight"]
    assert (ours[f"{q}.weight"] - base_q).abs().max() > 1e-3


def test_adapter_folder_loads_back_in_peft_with_the_same_outputs(tiny_pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = _adapted(tiny_pair)
    nbytes = save_adapter(peft_model, tmp_path / "adapter", torch.float32)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    n_adapter = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert nbytes == 4 * n_adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ids = torch.tensor([[3, 9, 27, 81, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits)
