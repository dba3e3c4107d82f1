"""Typed configuration: the dataclasses are the schema and hold every default once.

YAML files under `conf/` only pick values; `compose()` (in `grpo_fsdp.cli`) turns the
composed tree into these dataclasses with `OmegaConf.to_object`, so library code receives plain,
typed objects and never calls `cfg.get(...)`.

`validation.validate()` refuses impossible combinations before any weight is loaded.
"""

from __future__ import annotations

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
    enabled: bool = False  # LoRA adapters on the decoder's linears, every base weight frozen (lora.py)
    rank: int = 16  # r
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input only
    # last names of the linears to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or [all-linear]
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


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
    # GRPO training micro-batches (the shared-prefix layout): auto | sdpa | flex | fa2_varlen (grpo_attention.py)
    grpo_attention: str = "auto"
    load_in_4bit: bool = False  # NF4 base weights under LoRA (torchao, quant.py); needs lora.enabled
    lora: LoraConfig = field(default_factory=LoraConfig)
    vllm_memory_share: float = 0.3  # colocated vLLM's gpu_memory_utilization (weights + KV cache), the rest is the trainer's
    vllm_kv_cache_gib: float = 0.0  # vLLM's KV cache in GiB instead of the share (on CPU, where the share is of host RAM)
    # How long a collective waits for a rank that does not arrive before the run ends with a line naming it
    # (a stopped, hung or dead rank). Every legitimate wait counts too: the other ranks wait at the next
    # collective while rank 1 evaluates between steps, so this must cover the longest evaluation
    # (MATH500 with k samples on vLLM: minutes) and a checkpoint save. 30 min by default, as before;
    # 10 min on the CPU profile, whose multi-process runs are tests and CI with small evaluations.
    collective_timeout_s: float = 1800.0


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
    tokenizer: str = ""  # hub id or local directory of the tokenizer; empty: path's, or the byte-level tiny one
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
    # Share of the train split's solutions that estimate instead of working the sum out: "The answer is about
    # \boxed{20}." (the value rounded to the nearest ten). The demo's SFT data mixes careful and careless
    # answers so that the SFT model has a habit GRPO's exact-answer reward can remove (data/arithmetic.py).
    estimate_share: float = 0.0


@dataclass
class DataConfig:
    name: str = "arithmetic"  # arithmetic | gsm8k | math | math500 | preference | preference_arithmetic (DPO pairs)
    path: str = ""  # local JSONL file or directory holding <split>.jsonl; empty: hub_id
    hub_id: str = ""
    hub_config: str = ""
    train_split: str = "train"
    test_split: str = "test"
    limit: int = 0  # use at most this many training rows (0: all)
    max_prompt_length: int = 128  # tokens; longer prompts are dropped and counted
    max_length: int = 192  # prompt + completion tokens; SFT targets are truncated to fit
    instruction: str = INSTRUCTION  # appended to every question (training, rollouts, evaluation); "" for none
    # GRPO prompt order. none: shuffled epochs. sent: low -> high semantic entropy (arXiv 2512.04359) from
    # curriculum_file (python -m grpo_fsdp.curriculum writes it), in curriculum_stages stages, shuffled within each
    curriculum: str = "none"  # none | sent | auto (sent, computing curriculum_file first when it is missing)
    curriculum_file: str = ""
    curriculum_stages: int = 4
    curriculum_drop_solved: bool = False  # leave out prompts whose samples all agree (H = 0: no GRPO signal)
    curriculum_samples: int = 8  # M answers per prompt when curriculum=auto computes the file (the tool's samples=)
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
    ignore_eos: bool = False  # benchmarks: never stop at EOS, every completion max_new_tokens long (forced lengths)
    loss: str = "dapo"  # dapo (token mean over the step) | grpo | dr_grpo | bnpo | cispo (clipped IS weight, algorithms/surrogates.py)
    importance_level: str = "token"  # token (PPO ratio) | sequence (GSPO: length-normalised sequence ratio)
    rollout_correction: str = "tis"  # none | tis | mis: engine vs trainer log-prob mismatch (algorithms/rollout_correction.py)
    rollout_correction_cap: float = 2.0  # C: TIS caps the ratio at C, MIS drops tokens outside [1/C, C]
    rollout_correction_level: str = "token"  # token | sequence (one geometric-mean ratio per completion)
    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28  # clip-higher (DAPO); set 0.2 for the symmetric PPO clip
    beta: float = 0.0  # KL(k3) to the reference model; the reference is loaded only when > 0
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on completions cut at max_new_tokens
    filter_zero_variance: bool = False  # drop groups whose rewards are all equal (no signal)
    # entropy-selective policy gradient (arXiv 2506.01939; algorithms/entropy_mask.py): the surrogate only on the step's
    # ceil(q x n) highest-entropy tokens (1.0: off; the paper's 0.2), or on tokens with entropy >= a fixed threshold (0: off)
    entropy_top_quantile: float = 1.0
    entropy_threshold: float = 0.0
    shared_prefix: bool = True  # train each prompt once per micro-batch, its completions attending to it (shared_prefix.py)
    reward_correct: float = 1.0
    reward_format: float = 0.0
    overlong_penalty: float = 0.0  # weight of DAPO's soft overlong punishment
    overlong_buffer: int = 0
    reward_timeout_s: float = 5.0  # wall clock per sample; a timeout scores 0 and is counted
    reward_step_budget_s: float = 30.0  # wall clock for a step's grading on each rank; what is left then scores 0
    reward_timeout_warn_share: float = 0.1  # console warning when timeouts pass this share of a step's answers
    reward_workers: int = 2
    constant_reward_warn_steps: int = 5


@dataclass
class DPOConfig:
    """DPO and its variants on preference pairs (algorithms/dpo.py, recipes/dpo.py; data=preference or
    data=preference_arithmetic). One step = one optimizer step of `train.global_batch_size` pairs."""

    name: str = "dpo"
    loss: str = "sigmoid"  # sigmoid (DPO) | dpo_norm (per-token means: Tulu 3, OLMo 3) | ipo | robust
    beta: float = 0.1
    label_smoothing: float = 0.0  # eps: cDPO for sigmoid/dpo_norm, the flip rate of robust; in [0, 0.5)
    sft_weight: float = 0.0  # weight of the chosen side's token-mean NLL added to the loss (RPO)
    shared_prefix: bool = True  # each prompt once for both completions (recipes/dpo_pairs.py); false: padded rows
    micro_batch_tokens: int = 0  # > 0: micro-batches of up to this many tokens (a rank's pairs packed) instead of train.micro_batch_size pairs
    precompute_ref: bool = True  # reference log-probs in one pass before training, cached on disk (recipes/dpo_reference.py)
    ref_cache_dir: str = ""  # where the cache lives; empty: <run_dir>/ref_logps (reused when model + data match)
    ref_rows_per_shard: int = 256  # rows per cache file: the unit of resuming an interrupted precompute
    eval_pairs: int = 0  # > 0: this many pairs of data.test_split scored at the end (eval/reward_accuracy, recipes/dpo_eval.py)
    epochs: float = 0.0  # > 0: train.max_steps = epochs x (pairs // global_batch_size), set once the data is read
    warmup_ratio: float = 0.0  # > 0: optim.warmup_steps = round(warmup_ratio x optimizer steps), set with the steps


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
    every_steps: int = 0  # also every N train steps (rollouts in GRPO) (0: only at the end)
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
    # Step units. SFT: one step = one optimizer step. GRPO: one step = one rollout, trained in
    # plan.optimizer_steps_per_batch optimizer steps (prompts_per_step x group_size x updates_per_rollout
    # / global_batch_size; the start-up table prints it). optim.warmup_steps counts optimizer steps;
    # checkpoint.every_steps and eval.every_steps count these steps.
    max_steps: int = 60  # steps of the outer loop: optimizer steps (SFT), rollouts (GRPO)
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    group_by_length: bool = True  # batch sequences of similar length to cut padding
    logprob_chunk_size: int = 256  # tokens' worth of logits through the LM head at once ([256, V] fp32; memory bound)
    lm_head: str = "auto"  # GRPO: fused (loss gradient in forward, 3 head matmuls) | blocked (4) | auto: fused where the loss allows
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 5  # optimizer steps (GRPO: a run has train.max_steps x optimizer steps per rollout)
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # every N train steps (rollouts in GRPO); 0: only at the end (and on SIGTERM)
    save_final: bool = True  # false: no checkpoint at the end (benchmarks; SIGTERM still saves)
    keep_last: int = 2
    resume: str = "none"  # none | auto | <path to a checkpoint directory>
    export_hf: bool = True  # write <run_dir>/hf (safetensors) at the end
    # keep a `best/` checkpoint beside the last N (never pruned, never picked by resume=auto): an eval metric
    # such as eval/gsm8k/accuracy (GRPO; a task of eval.tasks) and whether higher (max) or lower (min) is better
    best_metric: str = ""
    best_mode: str = "max"  # max | min


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "grpo-fsdp"
    wandb_entity: str = ""
    progress_bar: bool = True


@dataclass
class Config:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: Any = MISSING  # SFTConfig | GRPOConfig | DPOConfig, picked by algo=
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = ""  # empty: outputs/<algo>-<model>-<data>-<timestamp>; with checkpoint.resume=auto a stable key instead (checkpoint.py)
    dry_run: bool = False  # validate, print the batch table and memory estimate, exit


ALGO_SCHEMAS: dict[str, type] = {"sft": SFTConfig, "grpo": GRPOConfig, "dpo": DPOConfig}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in ALGO_SCHEMAS.items():
        cs.store(group="algo", name=f"{name}_schema", node=schema)
