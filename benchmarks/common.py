"""Shared by the benchmarks: Qwen2-family model shapes and the devices' peak bf16 FLOP/s."""

from __future__ import annotations

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
}

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs)."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)
