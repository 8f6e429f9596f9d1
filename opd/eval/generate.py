"""Generation for `opd eval`: a vLLM engine in this process, each sample seeded by its place."""

from __future__ import annotations

import os

from opd.data.prompts import render_ids
from opd.eval.runner import EvalSettings, problem_messages
from opd.samples import sample_seed


class VllmGenerator:
    def __init__(
        self,
        model_dir: str,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        kv_cache_memory_bytes: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        gpu = torch.cuda.is_available()
        if not gpu:  # CPU: the engine in this process starts 15 s sooner than in two more
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from opd.rollout.worker import whole_prompt_prefill

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # vLLM refuses a length past the model's positions (a model shorter than the default)
        context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            max_model_len=min(max_model_len, context or max_model_len),
            # on CPU the cache is sized directly (1 GiB); on GPU by the memory fraction
            kv_cache_memory_bytes=kv_cache_memory_bytes or (None if gpu else 1 << 30),
            enforce_eager=not gpu,
            gpu_memory_utilization=0.85 if gpu else 0.1,
            **({} if gpu else whole_prompt_prefill(max_model_len)),
        )

    def complete(
        self, conversations: list[list[dict]], *, temperature: float, max_tokens: int, seed: int
    ) -> list[str]:
        """One sampled reply per conversation, each seeded by its place."""
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": render_ids(self.tokenizer, m)} for m in conversations]
        params = [
            SamplingParams(
                temperature=temperature,
                max_tokens=max_tokens,
                seed=sample_seed(seed, 0, i, 0, "complete"),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [out.outputs[0].text for out in outputs]

    def __call__(self, problems: list, settings: EvalSettings) -> list[tuple[str, int, str, int]]:
        """(id, sample index, text, generated tokens) for every problem and sample."""
        from vllm import SamplingParams

        prompts, params, keys = [], [], []
        for i, p in enumerate(problems):
            ids = render_ids(self.tokenizer, problem_messages(p))
            for j in range(settings.samples):
                prompts.append({"prompt_token_ids": ids})
                params.append(
                    SamplingParams(
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                        max_tokens=settings.max_tokens,
                        seed=sample_seed(settings.seed, 0, i, j, "eval"),
                    )
                )
                keys.append((p.id, j))
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [
            (pid, j, out.outputs[0].text, len(out.outputs[0].token_ids))
            for (pid, j), out in zip(keys, outputs)
        ]
