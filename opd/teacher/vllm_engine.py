"""A teacher run by vLLM (`teacher.engine: vllm`): the log-probs of given tokens, from vLLM's
prompt log-probs.

The scorer hands the engine each sample as one token sequence (the teacher's prompt, then the
student's completion) and asks for one generated token with `prompt_logprobs=0`: vLLM then
returns, at every prompt position, the log-probability of the token actually there, from the
raw logits (temperature 1), which is the `sampled` signal. The engine shards the teacher over
`teacher.tensor_parallel_size` GPUs, so a teacher larger than one GPU scores this way. Other
signals need the teacher's distribution at ids vLLM does not choose (the student's top-k, the
whole vocabulary), so validation refuses them for this engine.
"""

from __future__ import annotations

import os

import torch

from opd.config.schema import TeacherConfig
from opd.signals.sampled import TokenScores

DEFAULT_TEMPLATE_ROOM = 256  # default max_model_len: rollout.max_model_len + this


class VllmTeacher:
    def __init__(self, cfg: TeacherConfig, path: str, device: str, max_model_len: int) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from opd.rollout.worker import whole_prompt_prefill

        gpu = device == "cuda"
        self.max_model_len = max_model_len
        self.llm = LLM(
            model=path,
            dtype=cfg.dtype,
            seed=0,
            tensor_parallel_size=cfg.tensor_parallel_size,
            # shards as worker processes of this actor, on the GPUs Ray gave it
            **({"distributed_executor_backend": "mp"} if cfg.tensor_parallel_size > 1 else {}),
            gpu_memory_utilization=cfg.memory_fraction(gpu),
            kv_cache_memory_bytes=None if gpu else 512 * 2**20,
            max_model_len=max_model_len,
            enforce_eager=not gpu,
            logprobs_mode="raw_logprobs",  # the model's own distribution, temperature 1
            **({} if gpu else whole_prompt_prefill(max_model_len)),
        )

    def score(self, seqs: list[list[int]], n_tokens: list[int], where: list[str]) -> list:
        """`TokenScores` of the last `n_tokens[i]` tokens of each sequence `seqs[i]`."""
        from vllm import SamplingParams, TokensPrompt

        for seq, w in zip(seqs, where, strict=True):
            if len(seq) + 1 > self.max_model_len:
                raise ValueError(
                    f"{w}: the teacher's prompt and the completion take {len(seq)} tokens, "
                    f"beyond teacher.max_model_len={self.max_model_len} (minus one): raise it"
                )
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False
        )
        scores = []
        for out, seq, n in zip(outs, seqs, n_tokens, strict=True):
            per_position = out.prompt_logprobs  # [None, {id: Logprob}, ...], one per token
            start = len(seq) - n
            lp = [per_position[p][seq[p]].logprob for p in range(start, len(seq))]
            scores.append(TokenScores(logprobs_BT=torch.tensor([lp], dtype=torch.float32)))
        return scores
