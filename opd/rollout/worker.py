"""The rollout worker: a vLLM engine that samples completions with their log-probs.

Sampling is seeded (`rollout.seed_by`): by each request's own seed (`sample_seed`), so that a
completion depends only on the weights and its request, or once per call (`batch_seed`), so
that it depends on the weights and the worker's whole batch; either way a resumed or restarted
run samples the same tokens. New weights
arrive through the methods of `opd.sync.vllm_extension`, mixed into vLLM's workers; the prefix
cache is reset after every update, since cached keys and values belong to the old weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from opd.cluster.devices import show_peer_gpus
from opd.config.schema import RolloutConfig
from opd.samples import GenerationRequest, Sample, SampleMeta

EXTENSION = "opd.sync.vllm_extension.WeightSyncExtension"
_VLLM_DEFAULT_MAX_LOGPROBS = 20


def whole_prompt_prefill(max_model_len: int) -> dict:
    """vLLM-CPU settings that never split a prompt's prefill across engine steps. A split
    prefill samples a token that vLLM throws away and then rewinds that request's seeded
    generator, which a CPU generator cannot do: the engine dies ("CPU Generator does not use
    offset") once a batch's prompts pass the 4,096-token step budget. Without chunking, a
    step takes whole prompts up to the budget and the rest wait for the next step."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}


def lora_engine_args(rank: int) -> dict:
    """vLLM's LoRA settings for a student's adapters of `rank`: one adapter at a time, and
    the smallest rank vLLM sizes its buffers for that holds it."""
    sizes = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed `max_lora_rank` values
    fits = min(s for s in sizes if s >= rank)
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": fits}


class RolloutWorker:
    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        seed: int,
        device: str = "cpu",
        gguf_file: str | None = None,
        compilation_config: dict | None = None,
        max_logprobs: int = 0,
        agent=None,
        lora_rank: int = 0,
    ) -> None:
        """`compilation_config` goes to vLLM as is (GPU, `enforce_eager: false`): e.g.
        `{"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}` captures CUDA graphs for decode
        without a torch.compile pass at start-up; None keeps vLLM's default.
        `max_logprobs`: the most top log-probs a request may ask for (the objective's top-k);
        vLLM refuses more than its own default of 20 unless told.
        `agent`: an enabled `AgentConfig`, for trajectories that call tools (`opd.agent`).
        `lora_rank` > 0: the student trains LoRA adapters of that rank; weight pushes are
        adapter folders, served through vLLM's LoRA support (`load_weights_from_dir`)."""
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if device == "cuda":  # the settings CUDA vLLM 0.25 was run with (benchmarks/RESULTS.md)
            show_peer_gpus()  # before CUDA starts: the NCCL weight group's peers must be visible
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        # the engine in this actor's process: how `opd train` ran on GPUs, what the in-process
        # tensor hand-over (`load_weights_from_tensors`) needs, and on CPU 15 s less start-up
        # than an engine-core and a worker process that each import vLLM again
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # a caller may have asked for an engine process of its own (set the variable to 1)
        self.engine_in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        from vllm import LLM

        self.cfg = cfg
        gpu = device == "cuda"
        model = os.path.join(model_path, gguf_file) if gguf_file else model_path
        self.llm = LLM(
            model=model,
            tokenizer=model_path,
            dtype=cfg.dtype,
            seed=seed,
            gpu_memory_utilization=cfg.memory_fraction(gpu),
            # On CPU vLLM subtracts its own memory from the RAM fraction: size the cache instead.
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes or (None if gpu else 512 * 2**20),
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not gpu,
            worker_extension_cls=EXTENSION,
            enable_sleep_mode=gpu and cfg.sleep,
            # log-probs of the distribution actually sampled from (after temperature, top-p)
            logprobs_mode="processed_logprobs",
            max_logprobs=max(max_logprobs, _VLLM_DEFAULT_MAX_LOGPROBS),
            **({"compilation_config": compilation_config} if compilation_config else {}),
            **({} if gpu else whole_prompt_prefill(cfg.max_model_len)),
            **(lora_engine_args(lora_rank) if lora_rank else {}),
        )
        self.lora_rank = lora_rank
        self.lora = None  # the adapter served (a LoRARequest); None: the base weights
        self.version = 0
        self.sleep_mode, self.asleep = gpu and cfg.sleep, False
        self.seed_by = cfg.seed_by if cfg.seed_by != "auto" else ("batch" if gpu else "request")
        self.sampler_logprobs = cfg.sampler_logprobs
        if self.sampler_logprobs is None:
            self.sampler_logprobs = not (gpu and cfg.max_staleness == 0 and agent is None)
        self.agent = None
        if agent is not None:
            from opd.agent.loop import AgentLoop

            self.agent = AgentLoop(agent, self.llm.get_tokenizer(), cfg.max_model_len)

    def generate(
        self,
        requests: list[GenerationRequest],
        batch_seed: int | None = None,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        topk: int = 0,
    ) -> tuple[list[SampleMeta], list[Sample]]:
        """One completion per request: its tokens, their log-probs and the top-`topk` ids,
        filled into the request's sample. Seeded per request, or once for the call with
        `batch_seed` (`rollout.seed_by`). Returns (their metadata, the samples): called with
        `num_returns=2`, so that the driver reads the metadata and passes the samples on."""
        from vllm import SamplingParams

        if self.asleep:
            raise RuntimeError("generate on a sleeping rollout worker: wake_up comes first")
        t0 = time.perf_counter()
        if self.agent is not None:  # trajectories seed each turn from the request's seed
            samples = self.agent.run(
                self.llm,
                requests,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                topk=topk,
                version=self.version,
                lora_request=self.lora,
            )
            return _metas(samples, time.perf_counter() - t0), samples
        per_request = batch_seed is None or self.seed_by == "request"
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=r.seed if per_request else None,
                # top-k ids come with the sampled token's log-prob at no extra cost
                logprobs=max(topk, 0) if topk > 0 or self.sampler_logprobs else None,
                flat_logprobs=True,  # a few flat lists per completion, not a dict per token
                detokenize=False,  # the loop works on token ids; no text is read back
            )
            for r in requests
        ]
        if not per_request:
            # unseeded requests draw from the engine's default generators, seeded here
            self.llm.collective_rpc("opd_seed_sampling", args=(batch_seed,))
        prompts = [{"prompt_token_ids": r.sample.prompt_ids} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        samples = [
            self._completed(r.sample, out.outputs[0], topk) for r, out in zip(requests, outputs)
        ]
        return _metas(samples, time.perf_counter() - t0), samples

    def _completed(self, sample: Sample, c, topk: int) -> Sample:
        """`sample` with vLLM's completion `c` filled in."""
        logprobs, topk_ids = _read_logprobs(c.logprobs, topk)
        return replace(
            sample,
            completion_ids=list(c.token_ids),
            logprobs=logprobs,
            topk_ids=topk_ids,
            finish_reason=c.finish_reason,
            policy_version=self.version,
        )

    def load_weights_from_dir(self, path: str, version: int) -> int:
        """The weights in folder `path` as `version`; a LoRA student's folder is an adapter,
        loaded here (not on the next generate) and served from then on."""
        if self.lora_rank:
            self._serve_adapter(path, version)
        else:
            self.llm.collective_rpc("opd_load_from_dir", args=(path, version))
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def _serve_adapter(self, path: str, version: int) -> None:
        from vllm.lora.request import LoRARequest

        engine = self.llm.llm_engine
        adapter = LoRARequest(f"opd-v{version}", version + 1, path)  # ids start at 1
        if adapter.lora_int_id in engine.list_loras():  # a folder with other weights
            engine.remove_lora(adapter.lora_int_id)
        engine.add_lora(adapter)
        if self.lora is not None and self.lora.lora_int_id != adapter.lora_int_id:
            engine.remove_lora(self.lora.lora_int_id)
        self.lora = adapter

    def load_weights_from_tensors(self, named: list[tuple[str, object]], version: int) -> int:
        """Load new weights from (name, tensor) pairs held in this process, and serve them as
        `version`. For a learner in the same process as the engine (an in-process composition
        of `Learner`, `TeacherScorer` and this worker, without Ray): its parameters reach the
        engine as they are, with no serialization or staging on the way, and are loaded in
        place (`opd.sync.vllm_extension`: on a GPU one device-to-device copy per weight). Names
        are the transformers model's (`model.named_parameters()`).

        Only valid with the engine in this process, which is the default on every device
        (`__init__` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 unless it is set already); with an
        engine process of its own it raises, since the tensors would have to be serialized to
        it (`load_weights_from_ipc` or `load_weights_from_dir` cross processes). Ray actors
        (`opd train`) use those, or the NCCL broadcast (`receive_weights`)."""
        if not self.engine_in_process:
            raise RuntimeError(
                "load_weights_from_tensors needs the vLLM engine in this process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0 when the worker was built); use "
                "load_weights_from_ipc or load_weights_from_dir across processes"
            )
        self.llm.collective_rpc("opd_load_tensors", args=(named, version))
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def load_weights_from_ipc(self, entries: list, handle: tuple, version: int) -> int:
        """Colocated GPU transport: the learner rank on this GPU shares its weight buffer.
        The entries travel as plain rows (`bucket.as_rows`)."""
        from opd.sync.bucket import as_rows

        self.llm.collective_rpc("opd_load_ipc", args=(as_rows(entries), handle, version))
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def direct_load_applies(self) -> bool:
        """Whether weights load straight into the parameters (opd.sync.vllm_extension)."""
        return bool(self.llm.collective_rpc("opd_direct_load")[0])

    def init_weight_group(self, address: str, port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc(
            "opd_init_weight_group", args=(address, port, rank_offset, world_size)
        )

    def receive_weights(self, specs: list[tuple[str, str, list[int]]], version: int) -> int:
        self.llm.collective_rpc("opd_receive_broadcast", args=(specs, version))
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def sleep(self) -> bool:
        """Colocated placement: free the device for the learner (weights offloaded, KV cache
        dropped). vLLM's sleep mode needs CUDA; on CPU this only records the state. Returns
        whether memory was actually released."""
        self.asleep = True
        if not self.sleep_mode:
            return False
        self.llm.sleep(level=1)
        return True

    def wake_up(self) -> bool:
        self.asleep = False
        if not self.sleep_mode:
            return False
        self.llm.wake_up()
        return True

    def ping(self) -> int:
        return self.version


def _metas(samples: list[Sample], seconds: float) -> list[SampleMeta]:
    """The samples' metadata, each carrying the seconds this call took in the worker."""
    return [replace(s.meta(), worker_s=seconds) for s in samples]


def _read_logprobs(flat, topk: int) -> tuple[list[float] | None, list[list[int]] | None]:
    """The sampled tokens' log-probs and, with `topk`, the top-k ids of each position, from
    vLLM's flat log-probs: at each position the sampled token comes first, then the top-k
    tokens in rank order (the sampled one again if it is among them). None: none were asked."""
    if flat is None:
        return None, None
    starts, ends = flat.start_indices, flat.end_indices
    logprobs = [flat.logprobs[i] for i in starts]
    if not topk:
        return logprobs, None
    return logprobs, [flat.token_ids[a + 1 : min(b, a + 1 + topk)] for a, b in zip(starts, ends)]
