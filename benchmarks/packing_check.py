"""Packed (padding-free, flash varlen) against padded forward and backward on the device.

    python benchmarks/packing_check.py --size qwen2.5-1.5b   # GPU, bf16
    python benchmarks/packing_check.py --size tiny           # CPU, fp32 (per-sequence SDPA)

Relative errors ||packed - padded|| / ||padded|| of the hidden states at real tokens, of the
log-probs at the targets and of the parameter gradients of their sum; fresh random inputs,
varied lengths. bf16 operands land between 1e-3 and 1e-2; fp32 far under 1e-3.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, report  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 700, 313, 64, 5])
    args = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.modeling import packing
    from opd.modeling.logprobs import final_hidden, gather_positions, token_logprobs

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    with dev:
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.size])).to(dtype)
    V, L = model.config.vocab_size, max(args.lengths)
    lens = torch.tensor(args.lengths)
    mask = (torch.arange(L)[None] < lens[:, None]).long().to(dev)
    ids = torch.randint(0, V, (len(lens), L), device=dev) * mask
    T = 32  # score the last 32 tokens of each row
    pos = torch.stack([torch.arange(n - 1 - T, n - 1).clamp_min(0) for n in args.lengths]).to(dev)
    targets = torch.randint(0, V, pos.shape, device=dev)

    def run(packed: bool):
        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if packed else packing.padded():
            hidden = final_hidden(model, ids, mask)
            lp, _ = token_logprobs(model, gather_positions(hidden, pos), targets, chunk=64)
            lp.sum().backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        return hidden.detach()[mask.bool()], lp.detach(), grads

    h_ref, lp_ref, g_ref = run(False)
    h, lp, g = run(True)
    h_ref2, _, g_ref2 = run(False)  # the padded path against itself: the noise floor
    report(
        {
            "benchmark": "packing_check",
            "size": args.size,
            "dtype": str(dtype),
            "lengths": args.lengths,
            "native_gqa": packing._native_gqa,
            "hidden_rel_err": rel(h, h_ref),
            "logprob_rel_err": rel(lp, lp_ref),
            "grad_rel_err": rel(g, g_ref),
            "padded_vs_padded_grad_rel_err": rel(g_ref2, g_ref),
            "finite": bool(torch.isfinite(g).all() and torch.isfinite(h).all()),
        }
    )


if __name__ == "__main__":
    main()
