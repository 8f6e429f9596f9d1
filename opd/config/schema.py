"""The recipe schema: one small dataclass per component; cross-field checks in __post_init__.

Model and data locations accept a folder/file path or a `registry:` name that `opd` prepares
from packages on the package index (see `opd.models.sources` and `opd.data.sources`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from opd.agent.config import AgentConfig
from opd.anchor.config import AnchorConfig
from opd.rewards.runner import RewardConfig

DTYPES = ("float32", "bfloat16", "float16")


def vllm_memory_fraction(utilization: float | None, num_gpus: float, gpu: bool) -> float:
    """A vLLM engine's `gpu_memory_utilization`: as set, else the actor's GPU share when it
    holds a fraction of a GPU (the rest is for the roles beside it), else 0.85; on CPU 0.1 of
    the RAM."""
    if utilization:
        return utilization
    if not gpu:
        return 0.1
    return num_gpus if 0 < num_gpus < 1 else 0.85


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}; valid: {', '.join(choices)}")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{key}={value} must be > 0")


def _check_optional_positive(key: str, value: float | None) -> None:
    if value is not None:
        _check_positive(key, value)


def _check_share(role: str, num_cpus: float, num_gpus: float) -> None:
    """A role's Ray resources per actor: some CPU, and whole GPUs or a fraction of one."""
    _check_positive(f"{role}.num_cpus", num_cpus)
    if num_gpus < 0:
        raise ValueError(f"{role}.num_gpus={num_gpus} must be >= 0")
    if num_gpus > 1 and num_gpus != int(num_gpus):
        raise ValueError(f"{role}.num_gpus={num_gpus}: a fraction of a GPU must be below 1")


@dataclass
class RunConfig:
    # the run directory: config.yaml, metrics.jsonl, checkpoints/, student/
    output_dir: str = "runs/default"
    seed: int = 0  # seeds sampling, data order and initialization; a resume continues it exactly
    resume: bool = True  # re-running the same command continues from checkpoints/latest
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # a progress bar on stderr
    # resume although the recipe differs from the one the run directory was started with
    # (beyond trainer.steps and how the run is watched or reached); false: refused, with a diff
    resume_changed: bool = False

    def __post_init__(self) -> None:
        _check_choice("run.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    train_path: str = MISSING  # jsonl, parquet, a `datasets` folder, or registry:<name>
    heldout_path: str | None = None  # default: the first `eval.heldout_prompts` of train_path
    prompt_field: str = "question"  # the row field holding the prompt text
    id_field: str | None = None  # the row field naming each prompt; null: its row number
    # a system turn put before every prompt (the student's and the teacher's)
    system_prompt: str | None = None
    demonstration_field: str | None = None  # shown to the teacher (sdft's context)
    completion_field: str | None = None  # reference completions (gkd's off-policy batches)
    # the reference answer a reward reads (`rewards:`; math_correct reads the record's
    # `answer`): copied there from this field of each row; None: the row as it is
    answer_field: str | None = None
    max_prompt_tokens: int = 512  # longer prompts are dropped and counted
    shuffle: bool = True  # shuffle the prompts each epoch (seeded by run.seed)
    # With several teachers (`teachers:`): the row field whose value picks a prompt's teacher
    # (each teacher's `route`), e.g. a domain or data-source column
    route_field: str | None = None

    def __post_init__(self) -> None:
        _check_positive("data.max_prompt_tokens", self.max_prompt_tokens)


@dataclass
class ModelConfig:
    path: str = MISSING  # HF folder, GGUF file, or registry:<name>
    gguf_file: str | None = None  # file name inside `path` when it is a folder of GGUFs
    chat_template: str | None = None  # overrides the tokenizer's template (a Jinja string)


@dataclass
class RolloutConfig:
    num_workers: int = 1  # data-parallel vLLM engines, prompts split among them
    prompts_per_step: int = 8  # prompts per training step
    samples_per_prompt: int = 1  # completions sampled per prompt (a group, for rewards)
    max_new_tokens: int = 64  # the longest completion
    # the sampling temperature (the learner uses it too: ratio 1 on-policy)
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling; below 1 only for losses without the sampler ratio
    dtype: str = "float32"  # vLLM's weights and compute
    # The fraction of the GPU's memory vLLM may use. Default on GPU: the worker's share when it
    # holds a fraction of a GPU (num_gpus 0.4 -> 0.4, leaving the rest to the roles beside it),
    # else 0.85; on CPU 0.1 of the RAM.
    gpu_memory_utilization: float | None = None
    # KV-cache size (default 512 MiB on CPU, where vLLM subtracts its own memory from the RAM
    # fraction; on GPU, whatever the utilization leaves)
    kv_cache_memory_bytes: int | None = None
    max_model_len: int = 1024  # vLLM's longest prompt + completion
    # None: eager on CPU; on GPUs vLLM's own default (torch.compile and CUDA graphs), what it
    # runs fastest and what TRL's vLLM trainers use
    enforce_eager: bool | None = None
    # vLLM's compilation config (GPU, enforce_eager: false), passed as is; e.g.
    # {mode: 0, cudagraph_mode: FULL_DECODE_ONLY}: CUDA graphs for decode, no torch.compile pass
    compilation_config: dict[str, Any] | None = None
    # auto: on GPUs ipc when colocated, nccl when split; dir on CPUs and for a teacher that
    # follows the student | dir | nccl | ipc (colocated GPUs: CUDA IPC from learner rank i to
    # rollout worker i)
    weight_sync: str = "auto"
    # Async rollouts: batches are generated up to this many steps ahead of the learner, so a
    # batch may come from a policy this many updates old (0: the synchronous loop). Colocated,
    # this needs `sleep: false`: vLLM then generates the next batch on the learner's devices
    # while the teacher and the learner work on this one.
    max_staleness: int = 0
    # How sampling is seeded, so that a resumed or restarted run samples the same tokens:
    # request: a seed per completion (`sample_seed`): it depends on the weights and its prompt
    # only, whatever the batch or the worker, but vLLM draws each seeded request's noise in a
    # loop of its own (1.35 s against 1.06 s at batch 64 on an H100, benchmarks/RESULTS.md);
    # batch: one seed per worker's call, from (run.seed, step, worker): a completion depends on
    # the whole batch that worker samples, which a resume or a restart sends again unchanged;
    # auto: batch on GPUs, request on CPUs
    seed_by: str = "auto"
    # The sampled tokens' log-probs from vLLM: pi_old of the ratio objectives, and the learner's
    # drift from the sampler (`reverse_kl/abs_log_ratio`). false: the learner's own log-probs,
    # taken before its update, stand in for them, which is exact for on-policy batches
    # (max_staleness 0: the learner holds the weights that sampled) and spares vLLM a log-
    # softmax over the vocabulary at every position (0.685 -> 0.608 s a call at batch 8 on an
    # H100, benchmarks/RESULTS.md); null (auto): false on GPUs for on-policy single-turn
    # rollouts, true otherwise
    sampler_logprobs: bool | None = None
    # Colocated: vLLM sleeps while the teacher and the learner run (its weights go to the host
    # and its KV cache is dropped, freeing its share of the GPU); false keeps it awake, saving
    # the sleep and wake-up (about 0.12 s a step on an H200) where everything fits beside it
    sleep: bool = True
    num_gpus: float = 0.0  # per worker
    num_cpus: float = 0.5  # per worker (Ray scheduling only)

    def memory_fraction(self, gpu: bool) -> float:
        """`gpu_memory_utilization`, or its default (see the key)."""
        return vllm_memory_fraction(self.gpu_memory_utilization, self.num_gpus, gpu)

    def __post_init__(self) -> None:
        for key in ("num_workers", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            _check_positive(f"rollout.{key}", getattr(self, key))
        _check_share("rollout", self.num_cpus, self.num_gpus)
        _check_positive("rollout.max_model_len", self.max_model_len)
        _check_optional_positive("rollout.kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization={self.gpu_memory_utilization} must lie in (0, 1]"
            )
        _check_choice("rollout.dtype", self.dtype, DTYPES)
        _check_choice("rollout.weight_sync", self.weight_sync, ("auto", "dir", "nccl", "ipc"))
        _check_choice("rollout.seed_by", self.seed_by, ("auto", "request", "batch"))
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness={self.max_staleness} must be >= 0")
        if self.sampler_logprobs is False and self.max_staleness > 0:
            raise ValueError(
                f"rollout.sampler_logprobs=false needs on-policy batches, but rollout."
                f"max_staleness={self.max_staleness}: a batch sampled by older weights needs "
                "their log-probs (set sampler_logprobs true or null)"
            )
        _check_positive("rollout.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p} must lie in (0, 1]")
        if self.num_workers > self.prompts_per_step:
            raise ValueError(
                f"rollout.num_workers={self.num_workers} exceeds rollout.prompts_per_step="
                f"{self.prompts_per_step}: a worker would get no prompt"
            )

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class TeacherConfig(ModelConfig):
    # frozen: fixed weights; ema: phi <- a theta + (1 - a) phi after every learner step;
    # live: phi = theta. ema and live receive the student's weight pushes (self-distillation).
    mode: str = "frozen"
    ema_alpha: float = 0.01  # mode ema: the weight of the student's new weights in each update
    dtype: str = "float32"  # the teacher's parameters and compute: float32, bfloat16 or float16
    token_budget: int = 8192  # tokens per forward pass
    compile: bool = False  # torch.compile each decoder layer (CUDA; pays once at the start)
    # How a teacher without a chat template (a base model) sees the conversation: a plain-text
    # format of {prompt} (the user turn) and {system} (empty without one), after its BOS.
    prompt_format: str = "{system}Question: {prompt}\nAnswer:\n"
    logprob_chunk_tokens: int = 1024  # log-softmax computed this many positions at a time
    # How the `full` signal reaches the learner: `hidden`, the teacher's final hidden states,
    # which the learner turns into logits with the teacher's LM head (loaded once; H numbers
    # a token instead of V); `logits`, the logits themselves; `auto`: hidden for a frozen
    # teacher in an HF folder, else logits (an EMA or live teacher's head moves)
    full_transport: str = "auto"
    # Data-parallel replicas of this teacher, one Ray actor each (num_gpus/num_cpus apiece):
    # a step's prompts are split among them by token count, a prompt's samples kept together
    num_workers: int = 1
    # With several teachers (`teachers:`): the name in metrics (teacher/<name>/...), and the
    # values of `data.route_field` whose prompts this teacher scores; the one teacher with no
    # `route` scores every prompt that no other teacher's route claims
    name: str = "teacher"
    # the data.route_field values this teacher scores (see name)
    route: list[str] = field(default_factory=list)
    # What runs the teacher's forward: `hf`, a transformers model in the actor (every signal,
    # EMA/live teachers); `vllm`, a vLLM engine returning the log-probs of the given tokens
    # (prompt log-probs), the `sampled` signal only, frozen teachers only, and the way to a
    # teacher spread over several GPUs (`tensor_parallel_size`, with num_gpus >= that)
    engine: str = "hf"
    tensor_parallel_size: int = 1  # engine vllm: GPUs the teacher is sharded over
    # vllm engine: the longest teacher prompt + completion (default: rollout.max_model_len +
    # 256, room for the teacher's own chat template) and the memory it may use (default: the
    # actor's GPU share when below 1, else 0.85; on CPU 0.1 with a 512 MiB KV cache)
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None  # engine vllm: see max_model_len
    num_gpus: float = 0.0  # GPUs (or a fraction of one) per teacher actor
    num_cpus: float = 0.5  # CPUs per teacher actor

    def __post_init__(self) -> None:
        _check_positive("teacher.num_workers", self.num_workers)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(
                f"teacher name {self.name!r}: use letters, digits, '_', '.' or '-' (it names "
                "metrics)"
            )
        _check_choice("teacher.dtype", self.dtype, DTYPES)
        _check_choice("teacher.mode", self.mode, ("frozen", "ema", "live"))
        if not 0 < self.ema_alpha <= 1:
            raise ValueError(f"teacher.ema_alpha={self.ema_alpha} must lie in (0, 1]")
        _check_positive("teacher.token_budget", self.token_budget)
        _check_positive("teacher.logprob_chunk_tokens", self.logprob_chunk_tokens)
        _check_choice("teacher.full_transport", self.full_transport, ("auto", "hidden", "logits"))
        if self.full_transport == "hidden" and self.mode != "frozen":
            raise ValueError(
                f"teacher.full_transport=hidden with teacher.mode={self.mode!r}: the learner "
                "holds a copy of the teacher's LM head, which an EMA or live teacher changes "
                "every step; use logits (or auto)"
            )
        _check_share("teacher", self.num_cpus, self.num_gpus)
        _check_choice("teacher.engine", self.engine, ("hf", "vllm"))
        _check_positive("teacher.tensor_parallel_size", self.tensor_parallel_size)
        _check_optional_positive("teacher.max_model_len", self.max_model_len)
        if self.engine != "vllm":
            if self.tensor_parallel_size > 1:
                raise ValueError(
                    f"teacher.tensor_parallel_size={self.tensor_parallel_size} spreads the "
                    "teacher over GPUs through vLLM: set teacher.engine=vllm"
                )
            return
        if self.mode != "frozen":
            raise ValueError(
                f"teacher.engine=vllm with teacher.mode={self.mode!r}: the vLLM teacher does "
                "not take weight pushes; use teacher.engine=hf for an EMA or live teacher"
            )
        if self.gguf_file:
            raise ValueError("teacher.engine=vllm loads an HF folder: unset teacher.gguf_file")
        if self.num_gpus and self.num_gpus < self.tensor_parallel_size:
            raise ValueError(
                f"teacher.tensor_parallel_size={self.tensor_parallel_size} needs that many "
                f"GPUs in the teacher actor: teacher.num_gpus={self.num_gpus:g}"
            )

    def memory_fraction(self, gpu: bool) -> float:
        """The vllm engine's `gpu_memory_utilization`, or its default (see the key)."""
        return vllm_memory_fraction(self.gpu_memory_utilization, self.num_gpus, gpu)


@dataclass
class LoraConfig:
    # LoRA adapters (peft) instead of full fine-tuning: rank 0 trains every weight; rank r > 0
    # freezes the student and trains rank-r adapters on `target_modules`. Weight syncs then move
    # only the adapters (vLLM serves them through its LoRA support), checkpoints resume them
    # exactly, and the run exports the merged model plus the adapter (student/adapter/).
    rank: int = 0
    alpha: float = 16.0  # the adapters' scale is alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input while training
    # module names to adapt (peft's `target_modules`); ["all-linear"]: every linear layer of
    # the decoder, the LM head excepted
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank <= 512:
            raise ValueError(
                f"learner.lora.rank={self.rank} must lie in [0, 512] (0: no LoRA; vLLM serves "
                "adapters up to rank 512)"
            )
        if self.enabled:
            _check_positive("learner.lora.alpha", self.alpha)
            if not 0 <= self.dropout < 1:
                raise ValueError(f"learner.lora.dropout={self.dropout} must lie in [0, 1)")
            if not self.target_modules:
                raise ValueError("learner.lora.target_modules is empty: name modules to adapt")


@dataclass
class LearnerConfig:
    num_workers: int = 1  # DeepSpeed data-parallel ranks, one Ray actor each
    # DeepSpeed ZeRO stage 0-3; null: the lowest stage whose model states fit in half the
    # rank's GPU memory (0 for one rank; opd/learner/zero.py), stage 2 on CPUs
    zero_stage: int | None = None
    dtype: str = "float32"  # parameters and compute; bfloat16 enables DeepSpeed bf16
    lr: float = 1e-5  # AdamW's peak learning rate
    weight_decay: float = 0.0  # AdamW's weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's betas
    lr_schedule: str = "constant"  # constant | linear | cosine, after warmup
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    logprob_chunk_tokens: int = 1024  # log-softmax computed this many positions at a time
    # A micro-batch whose LM-head logits (tokens x vocab, model dtype) fit in this many GB
    # keeps them for backward instead of recomputing them (opd/modeling/head_logprob.py).
    logits_cache_gb: float = 2.0
    # recompute activations in backward (less memory, more time)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (CUDA; pays once at the start)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (peft); off at rank 0
    num_gpus: float = 0.0  # GPUs (or a fraction of one) per learner rank
    num_cpus: float = 0.5  # CPUs per learner rank

    def __post_init__(self) -> None:
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(
                f"learner.zero_stage={self.zero_stage}; valid: 0, 1, 2, 3, null (chosen)"
            )
        _check_choice("learner.dtype", self.dtype, DTYPES)
        _check_choice("learner.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        for key in ("num_workers", "lr", "micro_batch_size", "grad_clip", "logprob_chunk_tokens"):
            _check_positive(f"learner.{key}", getattr(self, key))
        if self.logits_cache_gb < 0:
            raise ValueError(f"learner.logits_cache_gb={self.logits_cache_gb} must be >= 0")
        if len(self.betas) != 2:
            raise ValueError(f"learner.betas={self.betas} must have two values")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"learner.betas={self.betas}: each must lie in [0, 1)")
        for key in ("warmup_steps", "weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"learner.{key}={getattr(self, key)} must be >= 0")
        _check_share("learner", self.num_cpus, self.num_gpus)


@dataclass
class ObjectiveConfig:
    # reverse_kl, gkd, sdft, sft, simct, grpo, trrd, sod, or a user's (import_path)
    name: str = "reverse_kl"
    import_path: str | None = None  # "pkg.module:Class" for an objective outside opd
    # the objective's parameters (docs/objectives.md lists each one's)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    steps: int = 10  # optimizer steps of the run

    def __post_init__(self) -> None:
        _check_positive("trainer.steps", self.steps)


@dataclass
class CheckpointConfig:
    every: int = 10  # 0 disables periodic checkpoints (the final step is always saved)
    keep_last: int = 2  # checkpoints kept; older ones are pruned
    export_student: bool = True  # final HF-format export to <output_dir>/student

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0")
        _check_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class EvalConfig:
    every: int = 5  # heldout/reverse_kl at step 0 and every N steps; 0 disables
    at_start: bool = True  # also before the first step (step 0); false: every N steps only
    heldout_prompts: int = 16  # prompts held out for heldout/* metrics
    heldout_samples: int = 1  # completions per held-out prompt
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens
    benchmarks: list[str] = field(default_factory=list)  # e.g. [gsm8k-100, humaneval]
    benchmark_limit: int | None = 32  # first N problems of each benchmark
    benchmark_samples: int = 1  # completions per benchmark problem (pass@k from them)
    benchmark_temperature: float = 0.0  # 0: greedy
    benchmark_max_tokens: int = 256  # the longest benchmark completion

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every={self.every} must be >= 0")
        _check_positive("eval.heldout_prompts", self.heldout_prompts)
        for key in ("heldout_samples", "benchmark_samples", "benchmark_max_tokens"):
            _check_positive(f"eval.{key}", getattr(self, key))
        for key in ("max_new_tokens", "benchmark_limit"):
            _check_optional_positive(f"eval.{key}", getattr(self, key))
        if self.benchmark_temperature < 0:
            raise ValueError(
                f"eval.benchmark_temperature={self.benchmark_temperature} must be >= 0"
            )
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"eval.benchmarks={self.benchmarks} names a benchmark twice")


@dataclass
class LoggingConfig:
    """Experiment trackers beside metrics.jsonl, which is always written (opd/tracking.py)."""

    tensorboard: bool = False  # event files under <run dir>/tensorboard
    wandb: bool = False  # a Weights & Biases run (wandb_mode)
    mlflow: bool = False  # an MLflow run (mlflow_tracking_uri)
    run_name: str | None = None  # the trackers' run name; null: the run directory's name
    wandb_project: str = "opd"  # the W&B project
    # offline: files under <run dir>/wandb, no network (`wandb sync` uploads them); online
    wandb_mode: str = "offline"
    mlflow_tracking_uri: str | None = None  # null: file store <run dir>/mlruns
    mlflow_experiment: str = "opd"  # the MLflow experiment

    def __post_init__(self) -> None:
        _check_choice("logging.wandb_mode", self.wandb_mode, ("offline", "online"))

    @property
    def backends(self) -> list[str]:
        return [b for b in ("tensorboard", "wandb", "mlflow") if getattr(self, b)]


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address; None starts (or joins) a local instance
    num_cpus: int | None = None  # for a local instance
    timeout_s: float = 1800.0  # every remote call; a timeout names the role
    # split: rollout, teacher and learner on their own resources. colocated: rollout worker i
    # shares learner rank i's bundle (its devices); vLLM sleeps while the learner updates.
    placement: str = "split"
    # A rollout or teacher actor that dies is restarted by Ray up to this many times and its
    # work re-done; a learner that dies stops the run (re-run to resume from the checkpoint).
    max_restarts: int = 2

    def __post_init__(self) -> None:
        _check_choice("cluster.placement", self.placement, ("split", "colocated"))
        if self.max_restarts < 0:
            raise ValueError(f"cluster.max_restarts={self.max_restarts} must be >= 0")
        _check_positive("cluster.timeout_s", self.timeout_s)
        _check_optional_positive("cluster.num_cpus", self.num_cpus)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # more teachers, each prompt scored by one of them (`data.route_field`, `teacher.route`);
    # each entry is a whole teacher block (frozen), `teacher:` stays the first of them
    teachers: list[TeacherConfig] = field(default_factory=list)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # a reward on every training sample (opd/rewards/runner.py); off unless name or import_path
    rewards: RewardConfig = field(default_factory=RewardConfig)
    # multi-turn rollouts that call tools (opd/agent/); off unless agent.tools names one
    agent: AgentConfig = field(default_factory=AgentConfig)
    # the AAPA discriminator anchor (opd/anchor/; our formulation); off unless anchor.path is set
    anchor: AnchorConfig = field(default_factory=AnchorConfig)

    def __post_init__(self) -> None:
        per_micro_step = self.learner.num_workers * self.learner.micro_batch_size
        if self.rollout.batch_size % per_micro_step:
            raise ValueError(
                f"learner.micro_batch_size={self.learner.micro_batch_size} x "
                f"learner.num_workers={self.learner.num_workers} does not divide the batch "
                f"(rollout.prompts_per_step x rollout.samples_per_prompt = "
                f"{self.rollout.batch_size})"
            )
        if self.rollout.max_new_tokens + self.data.max_prompt_tokens > self.rollout.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens={self.data.max_prompt_tokens} + rollout.max_new_tokens="
                f"{self.rollout.max_new_tokens} exceeds rollout.max_model_len="
                f"{self.rollout.max_model_len}"
            )

        if self.eval.benchmarks and self.eval.benchmark_max_tokens >= self.rollout.max_model_len:
            raise ValueError(
                f"eval.benchmark_max_tokens={self.eval.benchmark_max_tokens} leaves no room for "
                f"a benchmark prompt in rollout.max_model_len={self.rollout.max_model_len}"
            )
        heldout_tokens = self.eval.max_new_tokens or self.rollout.max_new_tokens
        if heldout_tokens + self.data.max_prompt_tokens > self.rollout.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens={self.data.max_prompt_tokens} + eval.max_new_tokens="
                f"{heldout_tokens} (held-out completions) exceeds rollout.max_model_len="
                f"{self.rollout.max_model_len}"
            )

        if self.teacher.mode != "frozen" and self.teacher.path != self.student.path:
            raise ValueError(
                f"teacher.mode={self.teacher.mode!r} makes the teacher a copy of the student, so "
                f"teacher.path ({self.teacher.path}) must equal student.path ({self.student.path})"
            )
        if (
            self.cluster.placement == "colocated"
            and self.rollout.num_workers > self.learner.num_workers
        ):
            raise ValueError(
                f"cluster.placement=colocated puts rollout worker i on learner rank i's "
                f"devices: rollout.num_workers={self.rollout.num_workers} exceeds "
                f"learner.num_workers={self.learner.num_workers}"
            )
        if (
            self.cluster.placement == "colocated"
            and self.rollout.max_staleness
            and self.rollout.sleep
        ):
            raise ValueError(
                f"rollout.max_staleness={self.rollout.max_staleness} generates while the "
                "learner updates, but cluster.placement=colocated puts vLLM to sleep then: "
                "set rollout.sleep=false (vLLM generates beside the learner on its devices) "
                "or use split placement"
            )
        if self.agent.enabled and self.rollout.sampler_logprobs is False:
            raise ValueError(
                "rollout.sampler_logprobs=false with agent.tools: a trajectory's turns keep "
                "their sampler log-probs; set it true or null"
            )
        if self.cluster.placement == "colocated" and self.rollout.weight_sync == "nccl":
            raise ValueError(
                "rollout.weight_sync=nccl with cluster.placement=colocated: NCCL cannot join "
                "two processes on one GPU; use dir (or auto, which picks it when colocated)"
            )
        if self.rollout.weight_sync == "ipc" and self.cluster.placement != "colocated":
            raise ValueError(
                "rollout.weight_sync=ipc hands a learner's GPU buffer to the vLLM worker on the "
                "same GPU: it needs cluster.placement=colocated (use nccl when split)"
            )
        if self.teacher.mode != "frozen" and self.rollout.weight_sync in ("nccl", "ipc"):
            raise ValueError(
                "teacher.mode ema/live receives weights through rollout.weight_sync="
                f"dir; {self.rollout.weight_sync} pushes to the rollout engines only"
            )

        self._check_lora()
        self._check_teachers()

    def _check_lora(self) -> None:
        """LoRA moves adapters, not weights: only what can take an adapter may follow it."""
        if not self.learner.lora.enabled:
            return
        key = f"learner.lora.rank={self.learner.lora.rank}"
        if self.teacher.mode != "frozen":
            raise ValueError(
                f"{key} with teacher.mode={self.teacher.mode!r}: a teacher that follows the "
                "student takes whole weights; train the full student (rank 0) for ema/live"
            )
        if self.rollout.weight_sync not in ("auto", "dir"):
            raise ValueError(
                f"{key} syncs only the adapters, as files vLLM loads (auto/dir); "
                f"rollout.weight_sync={self.rollout.weight_sync} moves whole weights"
            )
        if self.student.gguf_file:
            raise ValueError(
                f"{key}: vLLM serves adapters on an HF folder; unset student.gguf_file"
            )
        if self.learner.zero_stage == 3:
            raise ValueError(
                f"{key} with learner.zero_stage=3: the adapters and their optimizer state are "
                "small; use stage 0-2 (or null), which keep the frozen weights whole"
            )

    def _check_teachers(self) -> None:
        every = self.all_teachers
        if len(every) == 1:
            if self.teacher.route or self.data.route_field:
                raise ValueError(
                    "teacher.route / data.route_field route prompts among several teachers: "
                    "list the others under teachers:, or remove them"
                )
            return
        names = [t.name for t in every]
        if len(set(names)) < len(names):
            raise ValueError(
                f"teacher names must differ (teacher.name and each teachers[i].name): {names}"
            )
        if not self.data.route_field:
            raise ValueError(
                f"{len(every)} teachers ({', '.join(names)}): set data.route_field, the data "
                "field whose value picks each prompt's teacher (each teacher's route)"
            )
        seen: dict[str, str] = {}
        for i, t in enumerate(every):
            # the `full` signal's hidden transport keeps one teacher's LM head in the learners,
            # which would turn the other teachers' hidden states into wrong logits
            if t.full_transport == "hidden":
                key = "teacher" if i == 0 else f"teachers[{i - 1}]"
                raise ValueError(
                    f"{key}.full_transport=hidden with several teachers: the learners keep one "
                    "teacher's LM head; use logits (auto picks it with several teachers)"
                )
            t.full_transport = "logits" if t.full_transport == "auto" else t.full_transport
            if t.mode != "frozen":
                raise ValueError(
                    f"teacher {t.name!r}: mode={t.mode!r} with several teachers; a teacher "
                    "that follows the student is the only teacher of its run"
                )
            for value in t.route:
                if value in seen:
                    raise ValueError(
                        f"route value {value!r} is claimed by teachers {seen[value]!r} and "
                        f"{t.name!r}: each value picks one teacher"
                    )
                seen[value] = t.name
        catch_all = [t.name for t in every if not t.route]
        if len(catch_all) > 1:
            raise ValueError(
                f"teachers {', '.join(catch_all)} have no route: at most one teacher takes "
                "the prompts no route claims; give the others a route (a list of values of "
                f"data.route_field={self.data.route_field!r})"
            )

    @property
    def all_teachers(self) -> list[TeacherConfig]:
        """`teacher` and then `teachers`: index i is teacher i of `Sample.teacher`."""
        return [self.teacher, *self.teachers]

    @property
    def grad_accum_steps(self) -> int:
        return self.rollout.batch_size // (self.learner.num_workers * self.learner.micro_batch_size)
