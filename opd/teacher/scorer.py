"""The teacher scorer: a frozen transformers model that scores the student's own tokens.

It re-renders each conversation under the teacher's chat template (or, for a base model
without one, `teacher.prompt_format`), appends the student's completion, and returns exactly
what the objective's `TeacherRequest` asks for. Sequences are packed into forward passes by a
token budget; log-softmax runs in position chunks.

A teacher with another tokenizer (`signal="aligned"`, simct) re-tokenizes the completion's
text, aligns the two tokenizations and returns its half of each segment's virtual vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd.config.schema import TeacherConfig
from opd.data.prompts import render_ids
from opd.learner.logprobs import (
    HeadLogits,
    final_hidden,
    gather_positions,
    head_logits,
    token_logprobs,
)
from opd.learner.worker import TORCH_DTYPES
from opd.objectives.base import TeacherRequest
from opd.objectives.simct import SegmentIndex, side_logits
from opd.rollout.batch import Sample, _pad
from opd.teacher.pair import PROBE_TEXT, TokenizerPair


def load_causal_lm(path: str, gguf_file: str | None, dtype: torch.dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    model.eval()
    return model, tokenizer


def budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices, longest first, so that (rows x longest row) stays within `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class TeacherScorer:
    def __init__(
        self,
        cfg: TeacherConfig,
        model_path: str,
        device: str = "cpu",
        student_path: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.model, self.tokenizer = load_causal_lm(
            model_path, cfg.gguf_file, TORCH_DTYPES[cfg.dtype], self.device
        )
        if cfg.chat_template:
            self.tokenizer.chat_template = cfg.chat_template
        if cfg.compile and self.device.type == "cuda":
            from opd.learner.compile import compile_layers

            compile_layers(self.model)
        self.student_path = student_path
        self._pair: TokenizerPair | None = None
        self.version = 0
        self.last_update_norm = 0.0
        # Where scores are left: the host, for a learner in another process. A learner in this
        # process (benchmarks) sets the scorer's own device and nothing crosses the bus.
        self.output_device = torch.device("cpu")

    @classmethod
    def from_model(cls, cfg: TeacherConfig, model, tokenizer) -> TeacherScorer:
        """A scorer around an already-built model (benchmarks, tests)."""
        scorer = cls.__new__(cls)
        scorer.cfg, scorer.model, scorer.tokenizer = cfg, model.eval(), tokenizer
        scorer.device = next(model.parameters()).device
        scorer.version, scorer.last_update_norm = 0, 0.0
        scorer.student_path, scorer._pair = None, None
        scorer.output_device = torch.device("cpu")
        return scorer

    def prompt_ids(self, sample: Sample, context: str = "prompt") -> list[int]:
        """The conversation under the teacher's template; with `context="demonstration"` the
        user turn becomes sdft's teacher prompt (question + demonstration)."""
        messages = sample.messages
        if context == "demonstration":
            from opd.objectives.sdft import teacher_prompt

            if sample.demonstration is None:
                raise ValueError(
                    f"prompt {sample.prompt_id}: the objective shows the teacher a "
                    "demonstration, but the sample has none (data.demonstration_field)"
                )
            question = messages[-1]["content"]
            turn = {"role": "user", "content": teacher_prompt(question, sample.demonstration)}
            messages = [*messages[:-1], turn]
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
        """Fill `sample.teacher` for every sample and return them."""
        if request.signal == "aligned":
            self._score_aligned(samples, request)
        else:
            seqs = [self.prompt_ids(s, request.context) + s.completion_ids for s in samples]
            for idx in budget_batches([len(s) for s in seqs], self.cfg.token_budget):
                self._score_batch([samples[i] for i in idx], [seqs[i] for i in idx], request)
        for s in samples:
            s.teacher_version = self.version
        return samples

    # -- another tokenizer (simct) -----------------------------------------------------------

    def pair(self) -> TokenizerPair:
        if self._pair is None:
            if self.student_path is None:
                raise ValueError("signal 'aligned' needs the student's tokenizer (student_path)")
            self._pair = TokenizerPair.load(self.student_path, self.tokenizer)
        return self._pair

    def pair_report(self, probe: str = PROBE_TEXT) -> dict:
        """Start-up check of a cross-tokenizer pair: the shared-vocabulary size, and warnings
        where templates or special tokens make the texts the two sides see differ."""
        return self.pair().report(probe, uses_chat_template=bool(self.tokenizer.chat_template))

    def _score_aligned(self, samples: list[Sample], request: TeacherRequest) -> None:
        pair = self.pair()
        completions = [pair.retokenize(s.completion_ids) for s in samples]
        segments = [
            pair.align(s.completion_ids, c) for s, c in zip(samples, completions, strict=True)
        ]
        prompts = [self.prompt_ids(s, request.context) for s in samples]
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        for idx in budget_batches(lengths, self.cfg.token_budget):
            shared, span = self._aligned_batch(
                [prompts[i] for i in idx], [completions[i] for i in idx], [segments[i] for i in idx]
            )
            counts = [len(segments[i]) for i in idx]
            for i, sh, sp in zip(idx, shared.split(counts), span.split(counts), strict=True):
                samples[i].teacher = {
                    "aligned_segments": torch.tensor(segments[i], dtype=torch.long).reshape(-1, 4),
                    "aligned_shared": sh.cpu(),
                    "aligned_span": sp.cpu(),
                    "aligned_vocab": pair.student_vocab,
                    "teacher_tokens": torch.tensor(len(completions[i])),
                }

    def _aligned_batch(self, prompts, completions, segments) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.device
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
        L, U = max(len(r) for r in rows), max(1, max(len(c) for c in completions))
        input_ids = _pad(rows, L).to(d)
        attention = _pad([torch.ones(len(r), dtype=torch.long) for r in rows], L).to(d)
        positions = _pad(
            [torch.arange(len(p) - 1, len(p) - 1 + len(c)) for p, c in zip(prompts, completions)],
            U,
        ).to(d)
        ids = _pad([torch.tensor(c, dtype=torch.long) for c in completions], U).to(d)
        hidden = gather_positions(final_hidden(self.model, input_ids, attention), positions)
        index = SegmentIndex.from_alignments(segments, device=d)
        return side_logits(
            HeadLogits(self.model, hidden),
            ids,
            index.batch_K,
            index.teacher_start_K,
            index.teacher_len_K,
            self.pair().teacher_vocab.to(d),
        )

    def _score_batch(
        self, samples: list[Sample], seqs: list[list[int]], request: TeacherRequest
    ) -> None:
        d = self.device
        rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
        L = max(len(r) for r in rows)
        T = max(1, max(s.n_tokens for s in samples))
        input_ids = _pad(rows, L).to(d)
        attention = _pad([torch.ones(len(r), dtype=torch.long) for r in rows], L).to(d)
        starts = [len(seq) - s.n_tokens for seq, s in zip(seqs, samples)]
        positions = _pad(
            [torch.arange(st - 1, st - 1 + s.n_tokens) for st, s in zip(starts, samples)], T
        ).to(d)
        targets = _pad([torch.tensor(s.completion_ids, dtype=torch.long) for s in samples], T).to(d)
        ids = None
        if request.signal == "at_ids":
            ids = _pad(
                [
                    torch.tensor(s.topk_ids, dtype=torch.long).reshape(s.n_tokens, -1)
                    for s in samples
                ],
                T,
            ).to(d)
        hidden = gather_positions(final_hidden(self.model, input_ids, attention), positions)
        mask = _pad([torch.ones(s.n_tokens) for s in samples], T).to(d)  # padding skips the head
        lp_BT, lp_BTK = token_logprobs(
            self.model,
            hidden,
            targets,
            ids_BTK=ids,
            chunk=self.cfg.logprob_chunk_tokens,
            mask_BT=mask,
        )
        # `full`: the raw logits in the model's dtype (half the bytes of fp32 log-probs, and
        # exactly what the head computed); the learner normalizes them chunk by chunk.
        logits_BTV = head_logits(self.model, hidden) if request.signal == "full" else None
        out = self.output_device
        for i, s in enumerate(samples):
            n = s.n_tokens
            s.teacher = {"logprobs": lp_BT[i, :n].to(out)}
            if lp_BTK is not None:
                s.teacher["logprobs_at_ids"] = lp_BTK[i, :n].to(out)
            if logits_BTV is not None:
                s.teacher["logits_full"] = logits_BTV[i, :n].to(out)

    def ping(self) -> int:
        return self.version
