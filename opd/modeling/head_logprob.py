"""log p(target) through the LM head, with a hand-written backward that keeps the logits.

The default path (`token_logprobs`) checkpoints the head chunk by chunk: the [chunk, V]
logits are computed in forward, recomputed in backward, and autograd walks the fp32
log-softmax in between. When the whole micro-batch's logits fit a memory budget
(`learner.logits_cache_gb`), `HeadLogProb` instead writes them once into one [N, V] buffer
in the model's dtype, keeps only the fp32 log-normalizers, and in backward turns the buffer
in place into the logits' gradient, g (onehot(target) - softmax), followed by two large
GEMMs for the hidden states' and the head weight's gradients. That saves the head's second
forward GEMM (2 H V FLOPs per token) and most of the fp32 traffic, for N V bytes of memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HeadLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH: Tensor, w_VH: Tensor, t_N: Tensor, chunk: int) -> Tensor:
        N, V = h_NH.shape[0], w_VH.shape[0]
        logits_NV = torch.empty(N, V, dtype=h_NH.dtype, device=h_NH.device)
        lse_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        lp_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            torch.mm(h_NH[a:b], w_VH.t(), out=logits_NV[a:b])
            lf = logits_NV[a:b].float()
            lse_N[a:b] = torch.logsumexp(lf, -1)
            lp_N[a:b] = lf.gather(-1, t_N[a:b, None])[:, 0] - lse_N[a:b]
        ctx.chunk = chunk
        ctx.save_for_backward(h_NH, w_VH, t_N, lse_N, logits_NV)
        return lp_N

    @staticmethod
    def backward(ctx, g_N: Tensor):
        h_NH, w_VH, t_N, lse_N, grad_NV = ctx.saved_tensors  # the buffer becomes the gradient
        g_N = g_N.float()
        for a in range(0, h_NH.shape[0], ctx.chunk):
            b = min(h_NH.shape[0], a + ctx.chunk)
            p = torch.exp(grad_NV[a:b].float() - lse_N[a:b, None])
            p.mul_(-g_N[a:b, None])
            p.scatter_add_(-1, t_N[a:b, None], g_N[a:b, None])
            grad_NV[a:b] = p
        grad_h = torch.mm(grad_NV, w_VH) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(grad_NV.t(), h_NH) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None
