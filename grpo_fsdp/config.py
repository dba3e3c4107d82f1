"""Typed configuration: the dataclasses are the schema and hold every default once.

YAML files under `conf/` only pick values; `compose()` (in `grpo_fsdp.hydra_compose`) turns the
composed tree into these dataclasses with `OmegaConf.to_object`, so library code receives plain,
typed objects and never calls `cfg.get(...)`.

`validate()` refuses impossible combinations before any weight is loaded. Each refusal is a
`ConfigError` naming the field, the value and the fix, printed by the entry point as one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A mistake in the configuration that the user can fix: printed as one line, no traceback."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field_name, self.problem, self.fix = field_name, problem, fix
        super().__init__(f"{field_name}: {problem}; {fix}")


# --------------------------------------------------------------------------------------------
# hardware/: how the trainer is laid out on devices
# --------------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda
    nproc_per_node: int = 1  # what the launchers pass to torchrun; torchrun's own value wins
    gpu_memory_gib: float = 0.0  # memory of one device, for the dry-run estimate (0: not a GPU)
    reshard_after_forward: bool = True  # True: FULL_SHARD; False: ZeRO-2-like (params stay gathered)
    param_dtype: str = "float32"  # compute dtype of gathered parameters (bfloat16 on GPU)
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded params, grads and optimizer on CPU
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block
    attn_implementation: str = "sdpa"  # flash_attention_2 | sdpa | eager
    load_in_4bit: bool = False  # bitsandbytes NF4 base weights (with LoRA)
    lora: LoraConfig = field(default_factory=LoraConfig)
    vllm_memory_share: float = 0.3  # colocated vLLM's gpu_memory_utilization (weights + KV cache), the rest is the trainer's
    vllm_kv_cache_gib: float = 0.0  # vLLM's KV cache in GiB instead of the share (on CPU, where the share is of host RAM)


# --------------------------------------------------------------------------------------------
# model/: which network and tokenizer
# --------------------------------------------------------------------------------------------
@dataclass
class ArchConfig:
    """Architecture numbers. They build `model=tiny`; for hub models they feed the dry-run
    memory estimate (the real shapes come from the checkpoint's config.json at load time)."""

    vocab_size: int = 0  # 0: the tokenizer's size (tiny model)
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_embeddings: bool = False
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: str = ""  # hub id or local directory; empty builds the tiny model from `arch`
    template: str = "auto"  # auto (chat template if the tokenizer has one) | chat | plain
    trust_remote_code: bool = False
    arch: ArchConfig = field(default_factory=ArchConfig)


# --------------------------------------------------------------------------------------------
# data/: what the model reads
# --------------------------------------------------------------------------------------------
# The prompt instruction of DeepSeekMath / Qwen2.5-Math evaluations; the grader reads \boxed{}.
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------------------------
@dataclass
class ArithmeticConfig:
    num_train: int = 4000
    num_test: int = 200
    min_operand: int = 0
    max_operand: int = 20
    ops: list[str] = field(default_factory=lambda: ["+", "-"])
    seed: int = 1234


@dataclass
class DataConfig:
    name: str = "arithmetic"  # arithmetic | gsm8k | math | math500
    path: str = ""  # local JSONL file or directory holding <split>.jsonl; empty: hub_id
    hub_id: str = ""
    hub_config: str = ""
    train_split: str = "train"
    test_split: str = "test"
    limit: int = 0  # use at most this many training rows (0: all)
    max_prompt_length: int = 128  # tokens; longer prompts are dropped and counted
    max_length: int = 192  # prompt + completion tokens; SFT targets are truncated to fit
    instruction: str = INSTRUCTION  # appended to every question (training, rollouts, evaluation); "" for none
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)


# --------------------------------------------------------------------------------------------
# algo/: the objective (one schema per algorithm; the group option picks it)
# --------------------------------------------------------------------------------------------
@dataclass
class SFTConfig:
    name: str = "sft"
    loss_on_prompt: bool = False  # train on completion tokens only (the usual choice)


@dataclass
class GRPOConfig:
    """GRPO (Shao et al. 2024, DeepSeekMath) with the variants people use; see algorithms/grpo.py.

    One step = one rollout of `prompts_per_step x group_size` completions, then
    `updates_per_rollout` passes over it in optimizer steps of `train.global_batch_size` completions.
    """

    name: str = "grpo"
    prompts_per_step: int = 16  # prompts per rollout, over all ranks
    group_size: int = 8  # G completions per prompt
    updates_per_rollout: int = 1  # mu: passes over each rollout (old log-probs are recomputed when > 1 step)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    loss: str = "dapo"  # dapo (token mean over the step) | grpo | dr_grpo | bnpo
    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28  # clip-higher (DAPO); set 0.2 for the symmetric PPO clip
    beta: float = 0.0  # KL(k3) to the reference model; the reference is loaded only when > 0
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on completions cut at max_new_tokens
    filter_zero_variance: bool = False  # drop groups whose rewards are all equal (no signal)
    reward_correct: float = 1.0
    reward_format: float = 0.0
    overlong_penalty: float = 0.0  # weight of DAPO's soft overlong punishment
    overlong_buffer: int = 0
    reward_timeout_s: float = 5.0  # wall clock per sample; a timeout scores 0 and is counted
    reward_workers: int = 2
    constant_reward_warn_steps: int = 5


# --------------------------------------------------------------------------------------------
# rollout engine and evaluation during training
# --------------------------------------------------------------------------------------------
@dataclass
class RolloutConfig:
    engine: str = "auto"  # auto (vLLM when it imports and can serve the model, else transformers) | vllm | hf
    sleep_level: int = 1  # vLLM sleep while training: 1 offloads weights to host, 2 discards them (resynced anyway)
    probe_tolerance: float = 0.0  # max |log-prob gap| engine vs trainer on probe prompts after a sync; 0: 1e-3 fp32, 0.1 bf16
    probe_prompts: int = 4  # the first N training prompts are the probes (0: no probe)
    sync_bucket_mb: float = 256  # weights per vLLM reload call during a sync (cut between decoder layers)
    max_batch_size: int = 0  # transformers engine: sequences decoded together (0: all of a call)


@dataclass
class EvalConfig:
    """Evaluation between training steps, on rank 1 (rank 0 alone), with the rollout engine."""

    tasks: list[str] = field(default_factory=list)  # gsm8k | math | math500 | arithmetic; empty: no evaluation
    every_steps: int = 0  # also every N optimizer steps (0: only at the end)
    data_dir: str = ""  # local data (gsm8k/test.jsonl, math/test.jsonl, math/math500.jsonl); empty: the hub
    limit: int = 0  # problems per task (0: all)
    max_new_tokens: int = 0  # 0: the task's default
    k: int = 1  # samples per problem; k > 1 adds pass@k and maj@k at temperature 1
    batch_size: int = 64  # prompts per generate call
    table_rows: int = 32  # samples (problem, prediction, gold, correct) logged to W&B as a table per evaluation


# --------------------------------------------------------------------------------------------
# training loop, optimizer, checkpoints, logging
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    max_steps: int = 60  # optimizer steps
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    group_by_length: bool = True  # batch sequences of similar length to cut padding
    logprob_chunk_size: int = 1024  # tokens per chunk through the LM head (memory bound)
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 5
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end (and on SIGTERM)
    keep_last: int = 2
    resume: str = "none"  # none | auto | <path to a checkpoint directory>
    export_hf: bool = True  # write <run_dir>/hf (safetensors) at the end


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "grpo-fsdp"
    wandb_entity: str = ""
    progress_bar: bool = True
    log_every: int = 1


@dataclass
class Config:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: Any = MISSING  # SFTConfig (GRPO and DPO arrive as their own schemas)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = ""  # empty: outputs/<algo>-<model>-<data>-<timestamp>, chosen by rank 0
    dry_run: bool = False  # validate, print the batch table and memory estimate, exit


ALGO_SCHEMAS: dict[str, type] = {"sft": SFTConfig, "grpo": GRPOConfig}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in ALGO_SCHEMAS.items():
        cs.store(group="algo", name=f"{name}_schema", node=schema)


# --------------------------------------------------------------------------------------------
# validation: every check names the field, the value and the fix
# --------------------------------------------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("flash_attention_2", "sdpa", "eager")
DATASETS = ("arithmetic", "gsm8k", "math", "math500")
SCHEDULES = ("cosine", "linear", "constant")
TEMPLATES = ("auto", "chat", "plain")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith((".jsonl", ".json"))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}", f"choose one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be positive, got {value}", f"set {name}=<a number > 0>")


def validate(cfg: Config, world_size: int, cuda_available: bool) -> None:
    """Raise ConfigError on the first impossible setting. Cheap: touches no weights or network."""

    hw, model, data, train, optim = cfg.hardware, cfg.model, cfg.data, cfg.train, cfg.optim
    _choice("hardware.device", hw.device, ("cpu", "cuda"))
    if hw.device == "cuda" and not cuda_available and not cfg.dry_run:
        raise ConfigError("hardware.device", "is cuda but no CUDA device is visible", "use hardware=cpu or run on a GPU machine")
    _choice("hardware.param_dtype", hw.param_dtype, DTYPES)
    _choice("hardware.reduce_dtype", hw.reduce_dtype, DTYPES)
    _choice("hardware.attn_implementation", hw.attn_implementation, ATTENTION)
    if hw.load_in_4bit and not hw.lora.enabled:
        raise ConfigError("hardware.load_in_4bit", "4-bit base weights cannot be trained directly", "also set hardware.lora.enabled=true")
    if hw.load_in_4bit and hw.device != "cuda":
        raise ConfigError("hardware.load_in_4bit", "bitsandbytes 4-bit needs a CUDA device", "set hardware.load_in_4bit=false on CPU")
    if hw.lora.enabled:
        _positive("hardware.lora.rank", hw.lora.rank)

    if not model.path and model.name != "tiny":
        raise ConfigError("model.path", f"is empty for model {model.name!r}", "set model.path=<hub id or local directory>")
    if model.path and _looks_local(model.path) and not os.path.isdir(os.path.expanduser(model.path)):
        raise ConfigError("model.path", f"directory {model.path!r} does not exist", "point model.path at a saved model directory or a hub id like Qwen/Qwen2.5-1.5B")
    _choice("model.template", model.template, TEMPLATES)
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(f"model.arch.{name}", getattr(model.arch, name))
    if model.arch.num_heads % model.arch.num_kv_heads or model.arch.hidden_size % model.arch.num_heads:
        raise ConfigError("model.arch.num_heads", f"{model.arch.num_heads} heads do not divide hidden {model.arch.hidden_size} or are not a multiple of {model.arch.num_kv_heads} KV heads", "pick head counts that divide evenly")

    _choice("data.name", data.name, DATASETS)
    if data.path and not os.path.exists(os.path.expanduser(data.path)):
        raise ConfigError("data.path", f"{data.path!r} does not exist", "point data.path at a JSONL file or a directory of <split>.jsonl files, or leave it empty to use data.hub_id")
    if data.name != "arithmetic" and not data.path and not data.hub_id:
        raise ConfigError("data.path", f"neither data.path nor data.hub_id is set for {data.name!r}", "set data.path=<file.jsonl> or data.hub_id=<hub dataset id>")
    _positive("data.max_prompt_length", data.max_prompt_length)
    if data.max_length <= data.max_prompt_length:
        raise ConfigError("data.max_length", f"{data.max_length} leaves no room after data.max_prompt_length={data.max_prompt_length}", f"set data.max_length > {data.max_prompt_length}")
    if data.limit < 0:
        raise ConfigError("data.limit", f"must be >= 0, got {data.limit}", "use 0 for all rows")
    if data.name == "arithmetic":
        a = data.arithmetic
        _positive("data.arithmetic.num_train", a.num_train)
        if a.max_operand < a.min_operand:
            raise ConfigError("data.arithmetic.max_operand", f"{a.max_operand} < min_operand {a.min_operand}", "set max_operand >= min_operand")
        for op in a.ops:
            _choice("data.arithmetic.ops", op, ("+", "-", "*"))

    if isinstance(cfg.algo, GRPOConfig):
        _validate_grpo(cfg, world_size)
    _positive("train.max_steps", train.max_steps)
    _positive("train.micro_batch_size", train.micro_batch_size)
    _positive("train.global_batch_size", train.global_batch_size)
    _positive("train.logprob_chunk_size", train.logprob_chunk_size)
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        raise ConfigError(
            "train.global_batch_size",
            f"{train.global_batch_size} is not divisible by micro_batch_size {train.micro_batch_size} x world size {world_size} = {per_pass}",
            f"use a multiple of {per_pass}, e.g. train.global_batch_size={per_pass * max(1, train.global_batch_size // per_pass)}",
        )

    _positive("optim.lr", optim.lr)
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError("optim.betas", f"{list(optim.betas)} is not two numbers in [0, 1)", "set optim.betas=[0.9,0.95]")
    _choice("optim.schedule", optim.schedule, SCHEDULES)
    if not 0 <= optim.warmup_steps <= train.max_steps:
        raise ConfigError("optim.warmup_steps", f"{optim.warmup_steps} is outside [0, train.max_steps={train.max_steps}]", "set optim.warmup_steps to at most train.max_steps")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"{optim.min_lr_ratio} is outside [0, 1]", "set a fraction such as 0.1")
    if optim.max_grad_norm < 0:
        raise ConfigError("optim.max_grad_norm", f"must be >= 0, got {optim.max_grad_norm}", "use 0 to disable clipping")

    ck = cfg.checkpoint
    if ck.every_steps < 0 or ck.keep_last < 1:
        raise ConfigError("checkpoint.every_steps", f"every_steps={ck.every_steps}, keep_last={ck.keep_last}", "use every_steps >= 0 and keep_last >= 1")
    if ck.resume not in ("none", "auto") and not os.path.isdir(ck.resume):
        raise ConfigError("checkpoint.resume", f"{ck.resume!r} is not a checkpoint directory", "use none, auto, or the path of a step_* directory")
    if type(cfg.algo).__name__ not in {s.__name__ for s in ALGO_SCHEMAS.values()}:
        raise ConfigError("algo", f"unknown algorithm {cfg.algo!r}", f"choose one of {', '.join(ALGO_SCHEMAS)}")


def _validate_grpo(cfg: Config, world_size: int) -> None:
    g, t = cfg.algo, cfg.train
    for name in ("prompts_per_step", "group_size", "updates_per_rollout", "max_new_tokens", "reward_workers"):
        _positive(f"algo.{name}", getattr(g, name))
    _positive("algo.reward_timeout_s", g.reward_timeout_s)
    _validate_rollout_eval(cfg)
    _choice("algo.loss", g.loss, ("dapo", "grpo", "dr_grpo", "bnpo"))
    _choice("algo.advantage_scale", g.advantage_scale, ("group", "batch", "none"))
    if g.group_size < 2:
        raise ConfigError("algo.group_size", f"{g.group_size} leaves no group to compare against", "use algo.group_size >= 2")
    if g.prompts_per_step % world_size:
        raise ConfigError("algo.prompts_per_step", f"{g.prompts_per_step} prompts do not split over {world_size} ranks",
                          f"use a multiple of {world_size}")
    rollout = g.prompts_per_step * g.group_size
    if rollout % t.global_batch_size:
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} completions per optimizer step do not divide the "
                          f"rollout of {g.prompts_per_step} prompts x {g.group_size} = {rollout}",
                          f"use a divisor of {rollout}, e.g. train.global_batch_size={rollout}")
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError("algo.temperature", f"temperature={g.temperature}, top_p={g.top_p}, top_k={g.top_k}",
                          "use temperature >= 0, top_p in (0, 1], top_k >= 0")
    if not (0 <= g.clip_eps_low < 1 and g.clip_eps_high >= 0):
        raise ConfigError("algo.clip_eps_low", f"clip range [{g.clip_eps_low}, {g.clip_eps_high}]", "use 0 <= clip_eps_low < 1, clip_eps_high >= 0")
    if g.beta < 0:
        raise ConfigError("algo.beta", f"must be >= 0, got {g.beta}", "use 0 to train without a reference model")


def _validate_rollout_eval(cfg: Config) -> None:
    r, e = cfg.rollout, cfg.eval
    _choice("rollout.engine", r.engine, ("auto", "vllm", "hf"))
    _choice("rollout.sleep_level", str(r.sleep_level), ("1", "2"))
    if r.probe_tolerance < 0 or r.probe_prompts < 0 or cfg.hardware.vllm_kv_cache_gib < 0:
        raise ConfigError("rollout.probe_tolerance", f"probe_tolerance={r.probe_tolerance}, probe_prompts={r.probe_prompts}, "
                          f"hardware.vllm_kv_cache_gib={cfg.hardware.vllm_kv_cache_gib}", "use values >= 0 (0: automatic / off)")
    _positive("rollout.sync_bucket_mb", r.sync_bucket_mb)
    if not 0 < cfg.hardware.vllm_memory_share < 1:
        raise ConfigError("hardware.vllm_memory_share", f"{cfg.hardware.vllm_memory_share} is not a fraction in (0, 1)",
                          "set e.g. hardware.vllm_memory_share=0.3")
    for task in e.tasks:
        _choice("eval.tasks", task, ("gsm8k", "math", "math500", "arithmetic"))
    if e.every_steps < 0 or e.limit < 0 or e.max_new_tokens < 0 or r.max_batch_size < 0 or e.table_rows < 0:
        raise ConfigError("eval.every_steps", f"every_steps={e.every_steps}, limit={e.limit}, max_new_tokens={e.max_new_tokens}, "
                          f"rollout.max_batch_size={r.max_batch_size}", "use values >= 0 (0: default / off)")
    _positive("eval.k", e.k)
    _positive("eval.batch_size", e.batch_size)
    if e.data_dir and not os.path.isdir(os.path.expanduser(e.data_dir)):
        raise ConfigError("eval.data_dir", f"{e.data_dir!r} is not a directory", "point it at a folder holding gsm8k/ and math/, or leave it empty")
