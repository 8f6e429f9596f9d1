"""Trajectories that call tools, advancing together: one batched vLLM call per turn for every
trajectory still going, then the turn's tool calls at once on a thread pool (the python tool's
sandboxes are processes), then the tool output appended under the chat template.

A trajectory ends when a turn holds no complete tool call (the model answered), after
`agent.max_turns` turns, or when its tokens reach `rollout.max_new_tokens` or the engine's
`max_model_len`. Each turn is sampled with a seed derived from the request's seed and the turn,
so a resumed run samples the same trajectories (the python tool is deterministic code).

What a trajectory becomes (`opd.samples.Sample`): `completion_ids` holds the whole
conversation after the prompt; `loss_mask` is 1 on the tokens the model wrote and 0 on the
inserted ones (their `logprobs` are 0.0 and never read); `step_ids` numbers the assistant
turns; `tool_calls` records each call's turn, tool, arguments, status and output."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field, replace

from opd.agent.calls import find_call, stop_strings
from opd.agent.config import AgentConfig
from opd.agent.tools import ToolBox, ToolResult
from opd.agent.turns import ToolTurns
from opd.samples import GenerationRequest, Sample, turn_seed


@dataclass
class _Trajectory:
    request: GenerationRequest
    first_turn_regex: str | None = None  # constrains the first turn (structured outputs)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    topk: list[list[int]] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    finish: str = ""

    @property
    def prompt_len(self) -> int:
        return len(self.request.sample.prompt_ids)


class AgentLoop:
    def __init__(self, cfg: AgentConfig, tokenizer, max_model_len: int) -> None:
        self.cfg = cfg
        self.turns = ToolTurns(tokenizer, cfg.tool_role)
        self.tools = ToolBox(
            cfg.tools, cfg.tool_timeout_s, cfg.tool_memory_mb, cfg.max_tool_output_chars
        )
        self.max_model_len = max_model_len
        self._pool = cf.ThreadPoolExecutor(cfg.tool_workers, thread_name_prefix="opd-tool")

    def run(
        self,
        llm,
        requests: list[GenerationRequest],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        topk: int,
        version: int,
        first_turn_regex: list[str | None] | None = None,
        lora_request=None,
    ) -> list[Sample]:
        """The requests' trajectories. `first_turn_regex`: one regex (or None) per request
        constraining its first turn, in place of `agent.first_turn_regex`."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        from opd.rollout.worker import _read_logprobs

        guides = first_turn_regex or [self.cfg.first_turn_regex] * len(requests)
        trajectories = [_Trajectory(r, g) for r, g in zip(requests, guides, strict=True)]
        for turn in range(self.cfg.max_turns):
            going = [t for t in trajectories if not t.finish]
            params = []
            for t in going:
                room = self._room(t, max_new_tokens)
                if room <= 0:
                    t.finish = "length"
                    continue
                params.append(
                    SamplingParams(
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=room,
                        seed=turn_seed(t.request.seed, turn),
                        logprobs=max(topk, 0),
                        flat_logprobs=True,
                        stop=stop_strings(self.cfg.format),
                        include_stop_str_in_output=True,
                        structured_outputs=(
                            StructuredOutputsParams(regex=t.first_turn_regex)
                            if turn == 0 and t.first_turn_regex
                            else None
                        ),
                    )
                )
            going = [t for t in going if not t.finish]
            if not going:
                break
            prompts = [{"prompt_token_ids": t.request.sample.prompt_ids + t.ids} for t in going]
            outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
            calls = []
            for t, out in zip(going, outputs, strict=True):
                c = out.outputs[0]
                logprobs, topk_ids = _read_logprobs(c.logprobs, topk)
                self._append(t, list(c.token_ids), logprobs, topk_ids, turn, model=True)
                call = find_call(c.text, self.cfg.format) if c.finish_reason != "length" else None
                if call is None or turn == self.cfg.max_turns - 1:
                    t.finish = c.finish_reason if call is None else "max_turns"
                else:
                    calls.append((t, call))
            results = self._pool.map(self._call, [call for _, call in calls])
            for (t, call), result in zip(calls, results, strict=True):
                inserted = self.turns.ids(result.output)
                room = self._room(t, max_new_tokens)
                if len(inserted) >= room:  # no room left for the model to answer
                    inserted, t.finish = inserted[: max(room, 0)], "length"
                self._append(t, inserted, [0.0] * len(inserted), None, turn, model=False)
                t.calls.append(
                    {
                        "turn": turn,
                        "name": call.name,
                        "arguments": call.arguments,
                        "status": result.status,
                        "output": result.output,
                        "seconds": round(result.seconds, 3),
                    }
                )
        return [self._sample(t, topk, version) for t in trajectories]

    def _call(self, call) -> ToolResult:
        if call.error is not None:
            return ToolResult("bad_call", call.error)
        return self.tools.call(call.name, call.arguments)

    def _room(self, t: _Trajectory, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.max_model_len - t.prompt_len) - len(t.ids)

    @staticmethod
    def _append(t, ids, logprobs, topk_ids, turn, *, model: bool) -> None:
        t.ids += ids
        t.logprobs += logprobs
        t.mask += [int(model)] * len(ids)
        t.steps += [turn] * len(ids)
        t.topk += topk_ids if topk_ids is not None else [[i] for i in ids]

    def _sample(self, t: _Trajectory, topk: int, version: int) -> Sample:
        topk_ids = None
        if topk > 0:  # inserted positions repeat their own token: they are out of the loss
            topk_ids = [row if len(row) == topk else row * topk for row in t.topk]
        return replace(
            t.request.sample,
            completion_ids=t.ids,
            logprobs=t.logprobs,
            topk_ids=topk_ids,
            finish_reason=t.finish or "stop",
            policy_version=version,
            loss_mask=t.mask,
            step_ids=t.steps,
            tool_calls=t.calls,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.tools.close()
