"""Self-distillation fine-tuning (SDFT, arXiv 2601.19897); docs/objectives.md#sdft.

The teacher is the model itself (EMA weights, kept by the teacher scorer) conditioned on a
demonstration: the student sees the question x, the teacher sees `teacher_prompt(x, demo)`,
and both score the student's own completion y. Per completion token, a divergence between the
student and that teacher: forward KL(P_T || P_S) by default (the authors' code note: all
results used forward KL), reverse KL or JSD(alpha) selectable, analytic over the student's
top-k plus a tail bucket (k = 20 matched the full vocabulary in tinker-cookbook's ablation)
or over the full vocabulary.

The loss of sequence i, with K_i its counted tokens (completion positions t >= skip_first):

    L_i = w_i * mean_{t in K_i} D_t,   w_i = mean_{t in K_i} min(pi_theta / pi_old, is_clip)

w_i (detached) corrects for the sampler/learner mismatch. Then the batch mean over sequences.

Normalization: a per-sequence mean cannot be recovered from a token sum, so this objective
declares `normalize_by = "sequences"`: `loss_sum` is sum_i L_i over the micro-batch's
sequences and `n_tokens` is the number of sequences in it; the learner divides by the number
of sequences in the whole step (all micro-batches and ranks). Metrics are sums over sequences
of per-sequence values, divided by the same count. A sequence with no counted token (at most
`skip_first` tokens) contributes 0 and still counts in that denominator (**ours**: the paper
does not say; this keeps the denominator a property of the batch, known before the forward).
The IS weight averages over the same counted tokens as the loss (**ours**).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.objectives.base import LossInputs, LossOutput, Normalizer, Objective, TeacherRequest
from opd.objectives.divergences import DIVERGENCES, full_divergence, topk_divergence

ESTIMATORS = ("topk", "full")

TEACHER_PROMPT = (
    "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)


def teacher_prompt(question: str, demonstration: str) -> str:
    """The teacher's user turn: the question, the demonstration, and the instruction."""
    return TEACHER_PROMPT.format(question=question, demonstration=demonstration)


@dataclass
class SDFTParams:
    divergence: str = "forward_kl"  # "forward_kl" | "reverse_kl" | "jsd"
    alpha: float = 0.5  # JSD's weight on the teacher in the mixture (jsd only)
    estimator: str = "topk"  # "topk": student top-k + tail bucket; "full": whole vocabulary
    k: int = 20  # support size for `topk`
    skip_first: int = 3  # completion tokens at the start of each sequence left out of the loss
    is_clip: float = 2.0  # cap on the per-token ratio pi_theta / pi_old in the IS weight
    full_chunk_tokens: int = 256  # tokens per chunk for `full`

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"objective.params.divergence={self.divergence!r}; valid: {', '.join(DIVERGENCES)}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"objective.params.alpha={self.alpha} must lie in [0, 1]")
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"objective.params.estimator={self.estimator!r}; valid: {', '.join(ESTIMATORS)}"
            )
        if self.k < 1:
            raise ValueError(f"objective.params.k={self.k} must be >= 1")
        if self.skip_first < 0:
            raise ValueError(f"objective.params.skip_first={self.skip_first} must be >= 0")
        if not self.is_clip > 0.0:
            raise ValueError(f"objective.params.is_clip={self.is_clip} must be > 0")
        if self.full_chunk_tokens < 1:
            raise ValueError(
                f"objective.params.full_chunk_tokens={self.full_chunk_tokens} must be >= 1"
            )


def _seq_mean(values_BT: Tensor, keep_BT: Tensor, n_B: Tensor, empty: float) -> Tensor:
    """Mean of each row over its kept positions (`n_B` of them); `empty` for rows with none.

    Positions outside `keep_BT` are dropped with `where`, so padding never leaks a NaN.
    """
    total = torch.where(keep_BT > 0, values_BT * keep_BT, torch.zeros_like(values_BT)).sum(-1)
    return torch.where(n_B > 0, total / n_B.clamp_min(1), torch.full_like(total, empty))


class SDFT(Objective):
    name: ClassVar[str] = "sdft"
    Params: ClassVar[type] = SDFTParams
    normalize_by: ClassVar[Normalizer] = "sequences"

    def teacher_request(self) -> TeacherRequest:
        if self.params.estimator == "topk":
            return TeacherRequest("at_ids", k=self.params.k)
        return TeacherRequest("full")

    def teacher_messages(self, sample) -> list[dict[str, str]]:
        """The student's conversation with the last user turn replaced by `teacher_prompt`:
        the question and the sample's demonstration (`data.demonstration_field`)."""
        if sample.demonstration is None:
            raise ValueError(
                f"prompt {sample.prompt_id}: sdft shows the teacher a demonstration, but the "
                "sample has none (data.demonstration_field)"
            )
        question = sample.messages[-1]["content"]
        turn = {"role": "user", "content": teacher_prompt(question, sample.demonstration)}
        return [*sample.messages[:-1], turn]

    def check(self, cfg) -> None:
        if not cfg.data.demonstration_field:
            raise ValueError(
                "objective 'sdft' shows the teacher a demonstration: set "
                "data.demonstration_field to the data field that holds it"
            )

    def uses_sampler_logprobs(self) -> bool:
        return True  # the importance weight min(pi_theta / pi_old, is_clip)

    def counted_mask(self, mask_BT: Tensor) -> Tensor:
        """`mask_BT` without each sequence's first `skip_first` completion positions.

        `_BT` tensors are right-padded completions, so position t is completion token t.
        """
        t = torch.arange(mask_BT.shape[1], device=mask_BT.device)
        return mask_BT * (t >= self.params.skip_first).to(mask_BT.dtype)

    def __call__(self, x: LossInputs) -> LossOutput:
        p = self.params
        if p.estimator == "topk":
            if x.student_logprobs_BTK is None or x.teacher.logprobs_BTK is None:
                raise ValueError("sdft topk needs student and teacher log-probs at ids")
            d_BT = topk_divergence(
                x.student_logprobs_BTK, x.teacher.logprobs_BTK, p.divergence, p.alpha
            )
        else:
            if x.student_logits_BTV is None or x.teacher.logits_BTV is None:
                raise ValueError("sdft full needs student logits and teacher log-probs")
            d_BT = full_divergence(
                x.student_logits_BTV,
                x.teacher.logits_BTV,
                p.divergence,
                p.alpha,
                chunk=p.full_chunk_tokens,
            )
        keep = self.counted_mask(x.mask_BT).to(d_BT.dtype)
        n_B = keep.sum(-1)
        seq_div_B = _seq_mean(d_BT, keep, n_B, empty=0.0)

        with torch.no_grad():  # the IS weight is a constant of the loss
            log_ratio_BT = (x.logprobs_BT - x.old_logprobs_BT).to(d_BT.dtype)
            log_clip = math.log(p.is_clip)
            ratio_BT = log_ratio_BT.clamp_max(log_clip).exp()  # min(ratio, is_clip), never inf
            weight_B = _seq_mean(ratio_BT, keep, n_B, empty=1.0)
            clipped_B = _seq_mean((log_ratio_BT > log_clip).to(d_BT.dtype), keep, n_B, 0.0)

        loss_sum = (weight_B * seq_div_B).sum()
        metrics = {
            "sdft/divergence": seq_div_B.detach().sum(),
            "sdft/is_weight": weight_B.sum(),
            "sdft/is_clipped_frac": clipped_B.sum(),
            "sdft/counted_tokens": n_B.sum(),
        }
        n_seqs = torch.tensor(float(x.mask_BT.shape[0]), device=x.mask_BT.device)
        return LossOutput(loss_sum=loss_sum, n_tokens=n_seqs, metrics=metrics)
