"""Shared by the benchmarks: Qwen2-family model shapes, the devices' peak rates, FLOP counts
and the environment line every benchmark prints."""

from __future__ import annotations

import json
import platform
import sys

SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=384,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    # the GKD side-by-side pair (TRL vs opd): Qwen2-0.5B- and Qwen2-1.5B-shaped, untied
    "student-0.6b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "tiny-teacher": dict(
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=384,
        tie_word_embeddings=False,
    ),
}
# the GKD teacher: the Qwen2.5-1.5B shape with an untied LM head (1.78 B parameters)
SHAPES["teacher-1.8b"] = {**SHAPES["qwen2.5-1.5b"], "tie_word_embeddings": False}
# The Qwen2.5-7B shape with the Qwen2.5-1.5B shape's LM-head rows (151,936; the real 7B pads
# its head to 152,064): full-vocabulary losses need one vocabulary size on both sides (TRL's
# DistillationTrainer refuses two), so the 1.5B student's teacher in opd_vs_trl_train.py
SHAPES["teacher-7b"] = {**SHAPES["qwen2.5-7b"], "vocab_size": SHAPES["qwen2.5-1.5b"]["vocab_size"]}

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM datasheet
HBM_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet
NVLINK_BYTES_S = {"H100": 450e9, "H200": 450e9}  # NVLink 4, one direction, datasheet


def _lookup(table: dict, device_name: str) -> float | None:
    return next((v for k, v in table.items() if k in device_name), None)


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs)."""
    return _lookup(PEAK_BF16, device_name)


def hbm_bandwidth(device_name: str) -> float | None:
    return _lookup(HBM_BYTES_S, device_name)


def nvlink_bandwidth(device_name: str) -> float | None:
    return _lookup(NVLINK_BYTES_S, device_name)


def param_counts(shape: dict) -> dict[str, int]:
    """Parameter counts of a Qwen2 shape: total, the decoder layers, embedding, LM head."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // heads
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + heads * d + 2 * kv * d  # + biases
    layer = attn + 3 * h * i + 2 * h
    embed = shape["vocab_size"] * h
    head = 0 if shape.get("tie_word_embeddings") else embed
    layers = n * layer
    return {"total": layers + embed + head + h, "layers": layers, "embed": embed, "head": head}


def forward_flops(shape: dict, seqs: list[tuple[int, int]]) -> float:
    """FLOPs a forward pass must do for (prompt, completion) sequences without padding: the
    decoder's matrix products on every token, causal attention, and the LM head on completion
    positions only (what the learner and the teacher compute)."""
    h, n = shape["hidden_size"], shape["num_hidden_layers"]
    layers = param_counts(shape)["layers"]
    tokens = sum(p + c for p, c in seqs)
    completions = sum(c for _, c in seqs)
    attn = sum(4 * h * (p + c) * (p + c + 1) / 2 for p, c in seqs) * n  # QK^T and AV, causal
    return 2 * layers * tokens + attn + 2 * h * shape["vocab_size"] * completions


def timed(fn, *args) -> float:
    """Seconds `fn(*args)` takes, the device's queued work included (CUDA is synchronized on
    both sides)."""
    import time

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "deepspeed", "vllm", "trl", "ray"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = platform.processor() or platform.machine() or "cpu"
    return info


def report(result: dict) -> None:
    """One JSON line with the environment merged in (what RESULTS.md tables are built from)."""
    print(json.dumps({**environment(), **result}), flush=True)


def build_folder(size: str, folder: str, dtype: str = "bfloat16", seed: int = 0) -> int:
    """A random-init Qwen2 of shape `size` saved as an HF folder with a small BPE tokenizer
    (token ids past the tokenizer's vocabulary are never detokenized); returns parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.models.tiny import build_tokenizer

    tok = build_tokenizer(folder, vocab_size=384)
    cfg = Qwen2Config(
        **SHAPES[size],
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(length)] for _ in range(n)]


def visible_devices(first: int, n: int) -> str:
    """CUDA_VISIBLE_DEVICES for a process whose cuda:0 must be GPU `first` while the other
    GPUs stay visible (so that NCCL can use peer-to-peer links between them)."""
    return ",".join(str((first + i) % n) for i in range(n))
