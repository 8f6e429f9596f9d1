"""The teacher scorer: a transformers model that scores the student's own tokens.

It renders each conversation under the teacher's chat template (or, for a base model without
one, `teacher.prompt_format`), appends the student's completion, and returns what the
objective's `TeacherRequest` asks for: the requested signal's module (`opd.signals`) computes
it with this scorer's model, tokenizer and budgets. The teacher is frozen, or follows the
student's weights (`teacher.mode`: an EMA of them, or a live copy) for self-distillation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opd.anchor.config import AnchorConfig
from opd.anchor.step import StepAnchor
from opd.config.schema import TeacherConfig
from opd.data.prompts import render_ids
from opd.modeling.loading import TORCH_DTYPES, load_causal_lm
from opd.rewards.runner import RewardConfig
from opd.samples import Sample, in_batch_order
from opd.signals import TeacherRequest, signal_of
from opd.teacher.rewards import StepRewards


class TeacherScorer:
    def __init__(
        self,
        cfg: TeacherConfig,
        model_path: str | None = None,
        device: str = "cpu",
        student_path: str | None = None,
        *,
        model=None,
        tokenizer=None,
        rewards: RewardConfig | None = None,
        anchor: tuple[AnchorConfig, str] | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """Loads `model_path` onto `device` (a Ray actor's constructor), or wraps an
        already-built `model` and `tokenizer` (kept where they are: in-process use).
        `rewards`: the reward the training samples get beside their scores (`StepRewards`);
        `anchor`: the discriminator anchor's settings and how the objective uses it
        (`StepAnchor`), run on this actor's device. `max_model_len`: the vllm engine's
        (`teacher.engine: vllm`; `teacher.max_model_len` wins where set)."""
        self.cfg = cfg
        self.rewards = StepRewards(rewards) if rewards is not None else None
        if (rewards is not None or anchor is not None) and student_path is None:
            raise ValueError("rewards and the anchor read the student's text: no student path")
        self.student_tokenizer = None  # loaded on first use (`written_texts`)
        self.engine = None  # a vLLM engine doing the forward (`teacher.engine: vllm`)
        if model is None and cfg.engine == "vllm":
            from transformers import AutoTokenizer

            from opd.teacher.vllm_engine import DEFAULT_TEMPLATE_ROOM, VllmTeacher

            length = cfg.max_model_len or (max_model_len or 0) + DEFAULT_TEMPLATE_ROOM
            self.engine = VllmTeacher(cfg, model_path, device, length)
            self.device = torch.device("cpu")  # what else runs here: rewards, the anchor
            model, tokenizer = None, AutoTokenizer.from_pretrained(model_path)
        elif model is None:
            self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
            model, tokenizer = load_causal_lm(
                model_path, cfg.gguf_file, TORCH_DTYPES[cfg.dtype], self.device
            )
        else:
            self.device = next(model.parameters()).device
        self.anchor = StepAnchor(*anchor, self.device) if anchor else None
        self.model, self.tokenizer = model.eval() if model is not None else None, tokenizer
        if cfg.chat_template:
            self.tokenizer.chat_template = cfg.chat_template
        if cfg.compile and self.device.type == "cuda" and self.model is not None:
            from opd.modeling.compile import compile_layers

            compile_layers(self.model)
        self.student_path = student_path
        self.signal_state: dict[str, Any] = {}  # what a signal keeps per teacher (a tokenizer pair)
        self.version = 0
        self.last_update_norm = 0.0

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The conversation the teacher conditions on (`sample.teacher_messages`, else the
        student's), under the teacher's template."""
        messages = sample.teacher_messages or sample.messages
        if self.tokenizer.chat_template:
            return render_ids(self.tokenizer, messages)
        return self.plain_prompt_ids(messages)

    def plain_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """BOS + `teacher.prompt_format` filled with the user turn (and the system turn)."""
        system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
        user = [m["content"] for m in messages if m["role"] == "user"]
        text = self.cfg.prompt_format.format(system=system, prompt=user[-1] if user else "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None else ids

    # -- self-distillation: the teacher follows the student --------------------------------

    @torch.no_grad()
    def update_from_dir(self, path: str, version: int) -> float:
        """Apply pushed student weights: `ema` mixes them in, `live` copies them.
        Returns the norm of the change (0 for a frozen teacher, which ignores pushes)."""
        if self.cfg.mode == "frozen":
            return 0.0
        from safetensors.torch import load_file

        a = 1.0 if self.cfg.mode == "live" else self.cfg.ema_alpha
        params = dict(self.model.named_parameters())
        sq = 0.0
        for file in sorted(Path(path).glob("*.safetensors")):
            for name, theta in load_file(str(file)).items():
                phi = params[name]
                delta = a * (theta.to(phi.device, torch.float32) - phi.float())
                if self.cfg.mode == "live":  # theta itself, not phi + (theta - phi) rounded
                    phi.copy_(theta)
                else:
                    phi.add_(delta.to(phi.dtype))
                sq += float(delta.pow(2).sum())
        self.version = version
        self.last_update_norm = sq**0.5
        return self.last_update_norm

    def save_state(self, path: str) -> None:
        """Weights that the checkpoint must keep: the EMA teacher's (others are recomputable)."""
        if self.cfg.mode != "ema":
            return
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.named_parameters()}
        save_file(weights, str(Path(path) / "teacher.safetensors"))
        (Path(path) / "version").write_text(str(self.version))

    @torch.no_grad()
    def load_state(self, path: str) -> None:
        if self.cfg.mode != "ema":
            return
        from safetensors.torch import load_file

        file = Path(path) / "teacher.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"teacher.mode=ema but the checkpoint has no {file}")
        params = dict(self.model.named_parameters())
        for name, value in load_file(str(file)).items():
            params[name].copy_(value)
        self.version = int((Path(path) / "version").read_text())

    @torch.no_grad()
    def score(self, samples: list[Sample], request: TeacherRequest) -> list[Sample]:
        """Fill `sample.teacher` with the requested signal's scores and return the samples."""
        if not samples:  # a replica given no prompt this time
            return samples
        signal = signal_of(request)
        if self.engine is not None and not signal.served_by_vllm:  # validation refuses it
            raise ValueError(f"teacher.engine=vllm cannot return signal {request.signal!r}")
        scores = signal.score(self, samples, request)
        for s, sc in zip(samples, scores, strict=True):
            s.teacher, s.teacher_version = sc, self.version
        return samples

    def score_shards(
        self, request: TeacherRequest, shards: int, ranks: dict | None, *parts: list[Sample]
    ) -> tuple:
        """((teacher version, reward metrics, samples scored), shard 0, ..., shard
        shards-1): the samples of `parts` (one rollout worker's each, which Ray resolves
        from references) in (prompt, sample) order, scored, rewarded where they carry a record
        (on the host, while the model scores them), without what only the teacher reads (the
        rollout's top-k ids travel inside the scores). `ranks`: None, every sample, shard r
        holding samples[r::shards]; else {sample key: learner rank} of the samples this scorer
        takes (a replica's, or a routed teacher's, part of the batch; `opd.teacher.pool`).
        Called with `num_returns=1 + shards`, so that each learner rank fetches its shard
        itself and the driver only sees the version and the metrics."""
        samples = in_batch_order(parts)
        if ranks is None:
            rank_of = [i % shards for i in range(len(samples))]
        else:
            samples = [s for s in samples if s.key in ranks]
            rank_of = [ranks[s.key] for s in samples]
        if not samples:  # a replica given no prompt this time
            return ((self.version, {}, 0), *([] for _ in range(shards)))
        rewards = self.rewards and any(s.record is not None for s in samples)
        texts = self.written_texts(samples) if rewards or self.anchor else []
        rewarded = [(s, t) for s, t in zip(samples, texts) if s.record is not None]
        pending = None
        if self.rewards and rewarded:
            pending = self.rewards.submit([s for s, _ in rewarded], [t for _, t in rewarded])
        self.score(samples, request)
        metrics = self.rewards.apply([s for s, _ in rewarded], pending) if pending else {}
        if self.anchor is not None:
            metrics.update(self.anchor.apply(samples, texts))
        for s in samples:
            s.topk_ids = s.teacher_messages = s.record = None
        out = [[] for _ in range(shards)]
        for s, r in zip(samples, rank_of, strict=True):
            out[r].append(s)
        return ((self.version, metrics, len(samples)), *out)

    def written_texts(self, samples: list[Sample]) -> list[str]:
        """What the model wrote in each sample (`Sample.written_ids`), decoded once with the
        student's tokenizer: the text the reward and the anchor both read."""
        if self.student_tokenizer is None:
            from transformers import AutoTokenizer

            self.student_tokenizer = AutoTokenizer.from_pretrained(self.student_path)
        ids = [s.written_ids for s in samples]
        return self.student_tokenizer.batch_decode(ids, skip_special_tokens=True)

    def signal_report(self, request: TeacherRequest) -> list[str]:
        """Start-up lines about the pair of models, where the signal has any."""
        return signal_of(request).report(self)

    def ping(self) -> int:
        return self.version
