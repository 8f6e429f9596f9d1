"""The learner: one DeepSpeed data-parallel rank per Ray actor.

Each step every rank gets its shard of the batch, scored by the teacher (a reference that the
driver passes on unread). The rank runs micro-batches with gradient accumulation, asks the
objective for a loss sum, normalizes it by the token count of the whole step (all ranks, all
micro-batches), and takes one optimizer step, or skips it when any gradient on any rank is not
finite.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from opd.cluster.devices import show_peer_gpus
from opd.config.schema import LearnerConfig, ObjectiveConfig, TeacherConfig
from opd.learner.cpu_ops import guard_shm_build
from opd.learner.microbatch import MicroBatch, collate
from opd.learner.zero import resolve_stage
from opd.modeling.loading import TORCH_DTYPES
from opd.modeling.logprobs import chunks_needed, final_hidden, gather_positions, token_logprobs
from opd.objectives import LossInputs, build_objective
from opd.samples import Sample, in_batch_order
from opd.signals import signal_of


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def _innermost_torch_optimizer(opt):
    """DeepSpeed wraps the torch optimizer (ZeRO); the update itself happens in the innermost."""
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


class Learner:
    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model_path: str,
        cfg: LearnerConfig,
        objective: ObjectiveConfig,
        total_steps: int,
        grad_accum_steps: int,
        seed: int,
        device: str,
        teacher: TeacherConfig | None = None,
        teacher_path: str | None = None,
    ) -> None:
        """`teacher`, `teacher_path`: for a signal that keeps part of the teacher here (the
        `full` signal's LM head, when the teacher sends hidden states)."""
        if device == "cuda":
            show_peer_gpus()  # before CUDA starts: NCCL peers must be visible
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        import deepspeed
        from transformers import AutoModelForCausalLM

        if device != "cuda":
            guard_shm_build()
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        deepspeed.init_distributed(
            dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[cfg.dtype])
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.compile and device == "cuda":
            from opd.modeling.compile import compile_layers

            compile_layers(model)
        model.config.use_cache = False
        self.peft_model = None  # LoRA: the PeftModel around `model` (adapters trainable)
        if cfg.lora.enabled:
            from opd.learner.lora import apply_lora

            self.peft_model = apply_lora(model, cfg.lora)
            if cfg.gradient_checkpointing:  # the frozen embeddings' output must carry grads
                model.enable_input_require_grads()
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        weight_bytes = TORCH_DTYPES[cfg.dtype].itemsize
        self.zero_stage = resolve_stage(
            cfg.zero_stage, n_params, world_size, device, weight_bytes, cfg.num_gpus
        )
        if self.peft_model is not None:  # the frozen weights stay whole on every rank
            self.zero_stage = min(self.zero_stage, 2)
        if rank == 0 and cfg.zero_stage is None:
            print(f"learner: ZeRO stage {self.zero_stage} ({n_params / 1e9:.2f} B parameters)")
        self.objective = build_objective(objective.name, objective.params, objective.import_path)
        self.signal = signal_of(self.objective.teacher_request())
        self.signal_state = self.signal.prepare_learner(teacher, teacher_path, self.device)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": cfg.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.dtype == "float16"},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": cfg.lr,
                    "betas": list(cfg.betas),
                    "weight_decay": cfg.weight_decay,
                    "torch_adam": True,
                    # one fused kernel over the fp32 master weights instead of a loop of them
                    **({"fused": True} if device == "cuda" else {}),
                },
            },
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        schedule = lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=self.peft_model if self.peft_model is not None else model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        # the transformers model (with LoRA: the adapted one inside the PeftModel)
        self.model = model if self.peft_model is not None else self.engine.module
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._ipc_bucket: tuple | None = None  # (entries, flat device buffer) for `ipc_weights`
        for p in self.model.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)
        self.skipped_steps = 0
        self._grad_norm: float | None = None  # before clipping, where DeepSpeed keeps none

    def _check_grad(self, grad: torch.Tensor) -> None:
        """Record a non-finite gradient (no host sync); `_step_or_skip` acts on it."""
        self._nonfinite |= ~torch.isfinite(grad).all()

    # -- one step ---------------------------------------------------------------------------

    def _loss_inputs(self, mb: MicroBatch) -> LossInputs:
        d = self.device
        # The model's parts are called directly, not through DeepSpeedEngine.forward, so do its
        # per-forward ZeRO bookkeeping here: without it ZeRO-3 never advances its micro-step
        # and every backward overwrites the accumulated gradient (only the last micro-batch
        # counted; measured with DeepSpeed 0.19.8).
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        hidden = final_hidden(self.model, mb.input_ids_BL.to(d), mb.attention_mask_BL.to(d))
        hidden_BTH = gather_positions(hidden, mb.positions_BT.to(d))
        scores = self.signal.learner_view(mb.teacher.to(d), self.signal_state)
        ids = self.signal.student_ids(scores)  # where the loss also needs the learner's log-probs
        n_chunks = None
        if self.zero_stage == 3 and self.world_size > 1:
            # each LM-head call gathers its weight on every rank: make the same number of calls
            need = chunks_needed(int(mb.mask_BT.sum()), self.cfg.logprob_chunk_tokens)
            need_t = torch.tensor(need, device=d)
            dist.all_reduce(need_t, op=dist.ReduceOp.MAX)
            n_chunks = int(need_t)
        lp_BT, lp_BTK = token_logprobs(
            self.model,
            hidden_BTH,
            mb.targets_BT.to(d),
            ids_BTK=ids,
            chunk=self.cfg.logprob_chunk_tokens,
            mask_BT=mb.mask_BT.to(d),
            n_chunks=n_chunks,
            cache_bytes=int(self.cfg.logits_cache_gb * 2**30),
            temperature=mb.temperature,  # pi_theta as the rollout sampled from it
        )
        return LossInputs(
            logprobs_BT=lp_BT,
            # without the sampler's log-probs (an on-policy batch): the learner's own, before
            # this step's update, are those of the weights that sampled
            old_logprobs_BT=(
                mb.old_logprobs_BT.to(d) if mb.old_logprobs_BT is not None else lp_BT.detach()
            ),
            mask_BT=mb.mask_BT.to(d),
            teacher=scores,
            student_logprobs_BTK=lp_BTK,
            targets_BT=mb.targets_BT.to(d),
            temperature=mb.temperature,
            advantages_B=mb.advantages_B.to(d) if mb.advantages_B is not None else None,
            steps_BT=mb.steps_BT.to(d) if mb.steps_BT is not None else None,
            anchor_B=mb.anchor_B.to(d) if mb.anchor_B is not None else None,
            **self.signal.student_inputs(self.model, hidden_BTH, scores),
        )

    def train_step(self, normalizer: int, *parts: list[Sample]) -> dict[str, float]:
        """One optimizer step over this rank's shard, scored by the teachers: `parts`, one
        list per scorer (teachers, replicas), merged in batch order. `normalizer` is the whole
        step's `step_normalizer` (all ranks): loss and metric sums are divided by it."""
        samples = in_batch_order(parts)
        self.model.train()
        mbs = self.cfg.micro_batch_size
        sums: dict[str, torch.Tensor] = {}
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        self._nonfinite.zero_()
        # Micro-batches of similar lengths waste less compute on padding; the step's gradient
        # is a sum over samples, so the grouping does not change it.
        samples = sorted(samples, key=lambda x: len(x.prompt_ids) + x.n_tokens)
        for i in range(0, len(samples), mbs):
            out = self.objective(self._loss_inputs(collate(samples[i : i + mbs])))
            # The engine averages gradients over ranks: scale by world size to get a sum.
            loss = out.loss_sum * (self.world_size / max(1, normalizer))
            self.engine.backward(loss, scale_wrt_gas=False)
            if i + mbs >= len(samples):
                self._step_or_skip()
            else:
                self.engine.step()
            loss_total += out.loss_sum.detach().double()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
        names = sorted(sums)
        packed = torch.stack([loss_total] + [sums[k] for k in names])
        dist.all_reduce(packed)  # on the device: NCCL reduces no CPU tensors
        packed = packed.cpu()
        metrics = {"train/loss": packed[0].item() / max(1, normalizer)}
        metrics.update({k: packed[j + 1].item() / max(1, normalizer) for j, k in enumerate(names)})
        if "anchor/abs_advantage" in metrics:  # the anchor's share of the advantage's size
            a, base = metrics["anchor/abs_advantage"], metrics["anchor/abs_base_advantage"]
            metrics["anchor/advantage_share"] = a / (a + base) if a + base > 0 else 0.0
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO-0 records none: the norm taken before the update
            norm = self._grad_norm
        metrics["train/grad_norm"] = float(norm) if norm is not None else float("nan")
        metrics["train/lr"] = self.engine.get_lr()[0]
        metrics["train/skipped_steps"] = self.skipped_steps
        return self.objective.finalize_metrics(metrics)

    @torch.no_grad()
    def evaluate(self, *parts: list[Sample]) -> dict[str, float]:
        """The objective's loss and metric *sums* over scored samples (`parts`, one list per
        scorer; one forward, no update), and the completion tokens they cover. Under ZeRO-3
        every rank must call this with >= 1 sample (the forward gathers parameters
        collectively)."""
        samples = in_batch_order(parts)
        if not samples:
            raise ValueError(f"learner rank {self.rank}: evaluate needs at least one sample")
        self.model.eval()
        out = self.objective(self._loss_inputs(collate(samples)))
        sums = {k: float(v) for k, v in out.metrics.items()}
        sums["loss"] = float(out.loss_sum)
        sums["tokens"] = float(sum(s.n_counted for s in samples))
        return sums

    def _step_or_skip(self) -> None:
        self._grad_norm = None
        if self.zero_stage == 0:  # the gradients are whole (and averaged) on every rank
            norms = [p.grad.float().norm() for p in self.model.parameters() if p.grad is not None]
            if norms:
                self._grad_norm = float(torch.stack(norms).norm())
        flag = self._nonfinite.to(torch.int32)
        dist.all_reduce(flag)  # non-finite on any rank skips the update on every rank
        if not flag.item():
            self.engine.step()
            return
        inner = _innermost_torch_optimizer(self.engine.optimizer)
        real_step = inner.step
        inner.step = lambda *a, **k: None  # the engine still ends its step: grads cleared
        try:
            self.engine.step()
        finally:
            inner.step = real_step
        self.skipped_steps += 1

    # -- weights and checkpoints -------------------------------------------------------------

    def _full_weights(self):
        """(name, whole parameter) in `named_parameters` order. Under ZeRO-3 each is gathered
        while it is handed out, a collective: every rank must walk the whole sequence, and a
        parameter is valid only until the next one is asked for."""
        import deepspeed

        for name, p in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=self.zero_stage == 3):
                yield name, p.detach()

    def state_dict_for_export(self, dtype: str) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (gathered under ZeRO-3; with LoRA, the adapters merged in);
        every rank must call this."""
        out = {}
        if self.peft_model is not None:
            from opd.learner.lora import merged_weights

            weights = merged_weights(self.model)
        else:
            weights = self._full_weights()
        for name, p in weights:
            if self.rank == 0:
                t = p.to(TORCH_DTYPES[dtype])
                out[name] = t.cpu() if t.is_cuda else t.clone()  # one copy either way
        return out if self.rank == 0 else None

    def export_to_dir(self, path: str, dtype: str) -> int:
        """Write the weights as safetensors into `path` (rank 0), or with LoRA the adapter
        folder vLLM loads; returns the weight bytes written."""
        from safetensors.torch import save_file

        if self.peft_model is not None:
            from opd.learner.lora import save_adapter

            if self.rank != 0:
                return 0
            return save_adapter(self.peft_model, path, TORCH_DTYPES[dtype])
        weights = self.state_dict_for_export(dtype)
        if self.rank != 0:
            return 0
        Path(path).mkdir(parents=True, exist_ok=True)
        tmp = Path(path) / "model.safetensors.tmp"
        save_file(weights, str(tmp))
        tmp.rename(Path(path) / "model.safetensors")
        return sum(t.numel() * t.element_size() for t in weights.values())

    def weight_specs(self, dtype: str) -> list[tuple[str, str, list[int]]]:
        """(name, dtype, shape) of every weight, in broadcast order (ZeRO-3 keeps the full
        shape in `ds_shape`)."""
        return [
            (name, dtype, list(getattr(p, "ds_shape", p.shape)))
            for name, p in self.model.named_parameters()
        ]

    def ipc_weights(self, dtype: str) -> tuple[list, tuple]:
        """Colocated GPU transport: the full weights (gathered under ZeRO-3) copied into one
        flat buffer on this rank's GPU, kept across steps, and a CUDA IPC handle to it for the
        vLLM worker on the same GPU: (bucket entries, torch's (rebuild function, args)). Every
        rank must call this (the ZeRO-3 gathers are collective); each serves its own worker."""
        from torch.multiprocessing.reductions import reduce_tensor

        from opd.sync.bucket import plan, view

        if self.device.type != "cuda":
            raise RuntimeError("ipc_weights needs CUDA: use rollout.weight_sync=dir on CPU")
        if self._ipc_bucket is None:
            entries, size = plan(self.weight_specs(dtype))
            self._ipc_bucket = (entries, torch.empty(size, dtype=torch.uint8, device=self.device))
        entries, bucket = self._ipc_bucket
        for e, (_, p) in zip(entries, self._full_weights()):
            view(bucket, e).copy_(p)
        torch.cuda.synchronize(self.device)
        return entries, reduce_tensor(bucket)

    def init_weight_group(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 joins the NCCL group of the rollout workers as its rank 0 (GPU transport)."""
        if self.rank != 0:
            return
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world_size)
        self.weight_comm = PyNcclCommunicator(group, device=self.device)

    def broadcast_weights(self, dtype: str) -> int:
        """Broadcast every weight from rank 0 (gathered under ZeRO-3; all ranks call this)."""
        nbytes = 0
        for _, p in self._full_weights():
            if self.rank == 0:
                t = p.to(TORCH_DTYPES[dtype]).contiguous()
                self.weight_comm.broadcast(t, src=0)
                nbytes += t.numel() * t.element_size()
        return nbytes

    def node_address(self) -> tuple[str, int]:
        import ray

        from opd.cluster.placement import free_port

        return ray.util.get_node_ip_address(), free_port()

    def save_pretrained(self, path: str, tokenizer_path: str) -> None:
        """HF-format export of the student (weights in the learner's dtype)."""
        from transformers import AutoTokenizer

        weights = self.state_dict_for_export(self.cfg.dtype)
        if self.rank == 0:
            # with LoRA `weights` are merged, under the transformers names
            self.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
            if self.peft_model is not None:  # and the adapter on its own
                from opd.learner.lora import save_adapter

                save_adapter(self.peft_model, Path(path) / "adapter", TORCH_DTYPES[self.cfg.dtype])
            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)

    def save_checkpoint(self, directory: str) -> None:
        self.engine.save_checkpoint(
            directory,
            tag="learner",
            client_state={"skipped_steps": self.skipped_steps},
            save_latest=False,
        )

    def load_checkpoint(self, directory: str) -> None:
        """Weights and plain state only: a checkpoint file holding other pickled objects is
        refused (`UnsafeCheckpointError`, naming the file) before any of its code runs."""
        from opd.learner.checkpoint import use_weights_only_loads

        use_weights_only_loads(self.engine)
        _, client = self.engine.load_checkpoint(
            directory, tag="learner", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise FileNotFoundError(f"no learner checkpoint in {directory}")
        self.skipped_steps = client.get("skipped_steps", 0)

    def ping(self) -> int:
        return self.rank
