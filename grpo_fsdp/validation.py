"""Configuration checks: `validate(cfg, world_size, cuda_available)` refuses impossible combinations
before any process group, weight or data set is touched. Every refusal is a `ConfigError` naming the
field, the value and the fix, printed by the entry point as one line.

Step units (TrainConfig): `train.max_steps` counts optimizer steps in SFT and rollouts in GRPO, each
rollout trained in `BatchPlan.optimizer_steps_per_batch` optimizer steps; `optim.warmup_steps` counts
optimizer steps, so it is compared with the run's optimizer steps, not with `train.max_steps`.
Checks that look at the machine (W&B credentials, host and device memory for vLLM) are in preflight.py.
"""

from __future__ import annotations

import importlib.util
import os

from grpo_fsdp.algorithms.separable import fused_head_problem
from grpo_fsdp.config import ALGO_SCHEMAS, Config, ConfigError, DPOConfig, GRPOConfig, OptimConfig
from grpo_fsdp.grpo_attention import KERNELS, unavailable
from grpo_fsdp.memory_fit import check_fits
from grpo_fsdp.plan import BatchPlan
from grpo_fsdp.preflight import check_vllm_memory, check_wandb

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("flash_attention_2", "sdpa", "eager")
DATASETS = ("arithmetic", "gsm8k", "math", "math500", "preference", "preference_arithmetic")
PREFERENCE_DATA = ("preference", "preference_arithmetic")  # DPO pairs (data/preference.py)
DPO_LOSSES = ("sigmoid", "dpo_norm", "ipo", "robust")  # algorithms/dpo.py LOSSES
SCHEDULES = ("cosine", "linear", "constant")
TEMPLATES = ("auto", "chat", "plain")
EVAL_TASKS = ("gsm8k", "math", "math500", "arithmetic")  # eval/tasks.py TASKS (not imported: eval is heavier)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear")


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
    _choice("hardware.grpo_attention", hw.grpo_attention, KERNELS)
    kernel_problem = unavailable(hw.grpo_attention, hw.device)
    if kernel_problem and not cfg.dry_run:
        raise ConfigError("hardware.grpo_attention", f"{hw.grpo_attention}: {kernel_problem}",
                          "use hardware.grpo_attention=auto (sdpa, or fa2_varlen on CUDA with flash-attn) or sdpa")
    _positive("hardware.collective_timeout_s", hw.collective_timeout_s)  # seconds a collective waits for a missing rank
    _validate_lora(cfg, world_size)

    if not model.path and model.name != "tiny":
        raise ConfigError("model.path", f"is empty for model {model.name!r}", "set model.path=<hub id or local directory>")
    if model.path and _looks_local(model.path) and not os.path.isdir(os.path.expanduser(model.path)):
        raise ConfigError("model.path", f"directory {model.path!r} does not exist", "point model.path at a saved model directory or a hub id like Qwen/Qwen2.5-1.5B")
    if model.tokenizer and _looks_local(model.tokenizer) and not os.path.isdir(os.path.expanduser(model.tokenizer)):
        raise ConfigError("model.tokenizer", f"directory {model.tokenizer!r} does not exist", "point model.tokenizer at a tokenizer directory or a hub id, or leave it empty")
    _choice("model.template", model.template, TEMPLATES)
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(f"model.arch.{name}", getattr(model.arch, name))
    if model.arch.num_heads % model.arch.num_kv_heads or model.arch.hidden_size % model.arch.num_heads:
        raise ConfigError("model.arch.num_heads", f"{model.arch.num_heads} heads do not divide hidden {model.arch.hidden_size} or are not a multiple of {model.arch.num_kv_heads} KV heads", "pick head counts that divide evenly")

    _choice("data.name", data.name, DATASETS)
    if data.path and not os.path.exists(os.path.expanduser(data.path)):
        raise ConfigError("data.path", f"{data.path!r} does not exist", "point data.path at a JSONL file or a directory of <split>.jsonl files, or leave it empty to use data.hub_id")
    if data.name not in ("arithmetic", "preference_arithmetic") and not data.path and not data.hub_id:
        raise ConfigError("data.path", f"neither data.path nor data.hub_id is set for {data.name!r}", "set data.path=<file.jsonl> or data.hub_id=<hub dataset id>")
    _positive("data.max_prompt_length", data.max_prompt_length)
    if data.max_length <= data.max_prompt_length:
        raise ConfigError("data.max_length", f"{data.max_length} leaves no room after data.max_prompt_length={data.max_prompt_length}", f"set data.max_length > {data.max_prompt_length}")
    if data.limit < 0:
        raise ConfigError("data.limit", f"must be >= 0, got {data.limit}", "use 0 for all rows")
    if data.name in ("arithmetic", "preference_arithmetic"):
        a = data.arithmetic
        _positive("data.arithmetic.num_train", a.num_train)
        if a.max_operand < a.min_operand:
            raise ConfigError("data.arithmetic.max_operand", f"{a.max_operand} < min_operand {a.min_operand}", "set max_operand >= min_operand")
        for op in a.ops:
            _choice("data.arithmetic.ops", op, ("+", "-", "*"))
        if not 0.0 <= a.estimate_share < 1.0:
            raise ConfigError("data.arithmetic.estimate_share", f"must be in [0, 1), got {a.estimate_share}",
                              "use 0 for worked solutions only, e.g. 0.5 for the demo's half")

    _positive("train.max_steps", train.max_steps)
    _positive("train.micro_batch_size", train.micro_batch_size)
    _positive("train.global_batch_size", train.global_batch_size)
    _positive("train.logprob_chunk_size", train.logprob_chunk_size)
    _choice("train.lm_head", train.lm_head, ("auto", "fused", "blocked"))
    if train.lm_head == "fused" and not isinstance(cfg.algo, GRPOConfig):
        raise ConfigError("train.lm_head", f"fused applies GRPO's per-token loss gradient; algo={cfg.algo.name} runs the "
                          "blocked head", "leave train.lm_head=auto")
    _validate_eval(cfg)
    if isinstance(cfg.algo, GRPOConfig):
        _validate_grpo(cfg, world_size)
    _validate_dpo(cfg)
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
    _validate_warmup(cfg, world_size)
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"{optim.min_lr_ratio} is outside [0, 1]", "set a fraction such as 0.1")
    if optim.max_grad_norm < 0:
        raise ConfigError("optim.max_grad_norm", f"must be >= 0, got {optim.max_grad_norm}", "use 0 to disable clipping")

    ck = cfg.checkpoint
    if ck.every_steps < 0:
        raise ConfigError("checkpoint.every_steps", f"must be >= 0, got {ck.every_steps}", "use 0 to save only at the end")
    if ck.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", f"must be >= 1, got {ck.keep_last} (the newest checkpoint is always kept)",
                          "set checkpoint.keep_last=1 or more")
    if ck.resume not in ("none", "auto") and not os.path.isdir(ck.resume):
        raise ConfigError("checkpoint.resume", f"{ck.resume!r} is not a checkpoint directory", "use none, auto, a step_* directory or a run directory")
    _validate_best(cfg)
    _validate_curriculum(cfg)
    if type(cfg.algo).__name__ not in {s.__name__ for s in ALGO_SCHEMAS.values()}:
        raise ConfigError("algo", f"unknown algorithm {cfg.algo!r}", f"choose one of {', '.join(ALGO_SCHEMAS)}")
    check_fits(cfg, world_size)  # the memory plan (estimate.py, memory_fit.py) over hardware.gpu_memory_gib: largest items, an override that fits
    check_wandb(cfg)


def _validate_lora(cfg: Config, world_size: int) -> None:
    """hardware.lora.* and hardware.load_in_4bit (lora.py, quant.py)."""
    hw, lora = cfg.hardware, cfg.hardware.lora
    if hw.load_in_4bit and not lora.enabled:
        raise ConfigError("hardware.load_in_4bit", "4-bit base weights cannot be trained directly", "also set hardware.lora.enabled=true")
    if not lora.enabled:
        return
    _positive("hardware.lora.rank", lora.rank)
    _positive("hardware.lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        raise ConfigError("hardware.lora.dropout", f"{lora.dropout} is outside [0, 1)", "use e.g. 0 or 0.05")
    unknown = [m for m in lora.target_modules if m not in LORA_TARGETS]
    if unknown or not lora.target_modules:
        raise ConfigError("hardware.lora.target_modules", f"{list(lora.target_modules)}: " + (
            f"{', '.join(unknown)} is not a decoder linear" if unknown else "empty"),
            f"choose from {', '.join(LORA_TARGETS)} (e.g. [q_proj,k_proj,v_proj,o_proj])")
    if not hw.load_in_4bit:
        return
    from grpo_fsdp.quant import SHARD_SPLITS

    if SHARD_SPLITS % world_size:
        raise ConfigError("hardware.load_in_4bit", f"NF4 weights are cut into {SHARD_SPLITS} equal row shards, which "
                          f"{world_size} ranks do not share evenly", f"use a world size dividing {SHARD_SPLITS} (1, 2, 4 or "
                          "8), or hardware.load_in_4bit=false")
    if hw.compile:
        raise ConfigError("hardware.compile", "torch.compile over NF4 weights (torchao tensor subclass) is not tested "
                          "here", "set hardware.compile=false with hardware.load_in_4bit=true")
    if importlib.util.find_spec("torchao") is None and not cfg.dry_run:
        raise ConfigError("hardware.load_in_4bit", "needs torchao (NF4 weights), which is not installed",
                          'pip install "torchao>=0.18" (it comes with this project\'s dependencies)')


def _validate_best(cfg: Config) -> None:
    """checkpoint.best_metric names a metric of the periodic evaluation (GRPO's), so it must be eval/<task>/..."""
    ck = cfg.checkpoint
    _choice("checkpoint.best_mode", ck.best_mode, ("max", "min"))
    if not ck.best_metric:
        return
    if not isinstance(cfg.algo, GRPOConfig):
        raise ConfigError("checkpoint.best_metric", "only GRPO evaluates between steps (eval.tasks)",
                          "drop checkpoint.best_metric for this algorithm")
    task = ck.best_metric.split("/")[1] if ck.best_metric.count("/") >= 2 and ck.best_metric.startswith("eval/") else ""
    if task not in cfg.eval.tasks:
        tasks = cfg.eval.tasks or ["gsm8k"]
        raise ConfigError("checkpoint.best_metric", f"{ck.best_metric!r} is not an eval/<task>/<metric> of eval.tasks={list(cfg.eval.tasks)}",
                          f"e.g. checkpoint.best_metric=eval/{tasks[0]}/accuracy with eval.tasks=[{tasks[0]}]")


def _validate_curriculum(cfg: Config) -> None:
    """data.curriculum=sent orders GRPO's prompts from a file the curriculum tool wrote (grpo_fsdp/curriculum/); auto
    computes that file at start-up when it is missing (curriculum/auto.py)."""
    d = cfg.data
    _choice("data.curriculum", d.curriculum, ("none", "sent", "auto"))
    if d.curriculum == "none":
        return
    if not isinstance(cfg.algo, GRPOConfig):
        raise ConfigError("data.curriculum", "orders GRPO's prompts only", "use data.curriculum=none with this algorithm")
    if d.curriculum_stages < 1:
        raise ConfigError("data.curriculum_stages", f"must be >= 1, got {d.curriculum_stages}", "e.g. data.curriculum_stages=4")
    if d.curriculum == "auto":  # the file is computed at start-up when missing (curriculum/auto.py)
        if d.curriculum_samples < 2:
            raise ConfigError("data.curriculum_samples", f"{d.curriculum_samples} answers per prompt give no entropy",
                              "use data.curriculum_samples=8 (2 at least)")
        return
    if not d.curriculum_file or not os.path.isfile(d.curriculum_file):
        what = "is not set" if not d.curriculum_file else f"{d.curriculum_file!r} is not a file"
        raise ConfigError("data.curriculum_file", what, "compute one with python -m grpo_fsdp.curriculum model=... data=... "
                          "samples=8 out=<file>, then pass data.curriculum_file=<file>; or set data.curriculum=auto to "
                          "compute it at start-up")


def _validate_warmup(cfg: Config, world_size: int) -> None:
    """Warmup counts optimizer steps; a GRPO step (rollout) holds several (called after the batch checks)."""
    warmup, max_steps = cfg.optim.warmup_steps, cfg.train.max_steps
    plan = BatchPlan.from_config(cfg, world_size)
    per_step, total = plan.optimizer_steps_per_batch, plan.optimizer_steps_total
    if 0 <= warmup <= total:
        return
    default = " (the default)" if warmup == OptimConfig.warmup_steps else ""
    run = f"{total} optimizer steps (train.max_steps={max_steps}" + (
        f" rollouts x {per_step} optimizer steps each)" if per_step > 1 else ")")
    if warmup < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {warmup}", f"set optim.warmup_steps=0..{total}")
    raise ConfigError("optim.warmup_steps", f"{warmup}{default} warmup optimizer steps exceed the run's {run}",
                      f"set optim.warmup_steps=0..{total}, or raise train.max_steps to at least {-(-warmup // per_step)}")


def _validate_grpo(cfg: Config, world_size: int) -> None:
    g, t = cfg.algo, cfg.train
    for name in ("prompts_per_step", "group_size", "updates_per_rollout", "max_new_tokens", "reward_workers"):
        _positive(f"algo.{name}", getattr(g, name))
    _positive("algo.reward_timeout_s", g.reward_timeout_s)
    _positive("algo.reward_step_budget_s", g.reward_step_budget_s)
    if not 0 <= g.reward_timeout_warn_share <= 1:
        raise ConfigError("algo.reward_timeout_warn_share", f"{g.reward_timeout_warn_share} is outside [0, 1]",
                          "give a share such as 0.1 (1 never warns)")
    _validate_rollout(cfg, world_size)
    _choice("algo.loss", g.loss, ("dapo", "grpo", "dr_grpo", "bnpo", "cispo"))
    _choice("algo.advantage_scale", g.advantage_scale, ("group", "batch", "none"))
    _choice("algo.importance_level", g.importance_level, ("token", "sequence"))
    _choice("algo.rollout_correction", g.rollout_correction, ("none", "tis", "mis"))
    _choice("algo.rollout_correction_level", g.rollout_correction_level, ("token", "sequence"))
    if not g.rollout_correction_cap > 1:  # C = 1 would cap every weight at 1 (TIS) or drop every token that differs (MIS)
        raise ConfigError("algo.rollout_correction_cap", f"{g.rollout_correction_cap} must be > 1 (the ratio band is "
                          "[1/C, C])", "set algo.rollout_correction_cap=2 (Yao et al.'s value), or algo.rollout_correction=none")
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
                          "use temperature > 0, top_p in (0, 1], top_k >= 0")
    if g.temperature == 0:  # eval/options.py refuses the same for k > 1 samples
        raise ConfigError("algo.temperature", f"0 (greedy) makes the {g.group_size} completions of a prompt identical: "
                          "every advantage is 0 and nothing is learned", "set algo.temperature > 0 (e.g. 1.0)")
    if not (0 <= g.clip_eps_low < 1 and g.clip_eps_high >= 0):
        raise ConfigError("algo.clip_eps_low", f"clip range [{g.clip_eps_low}, {g.clip_eps_high}]", "use 0 <= clip_eps_low < 1, clip_eps_high >= 0")
    if g.beta < 0:
        raise ConfigError("algo.beta", f"must be >= 0, got {g.beta}", "use 0 to train without a reference model")
    if not 0 < g.entropy_top_quantile <= 1:
        raise ConfigError("algo.entropy_top_quantile", f"{g.entropy_top_quantile} is not a share in (0, 1]",
                          "use 0.2 (keep the 20% highest-entropy tokens, arXiv 2506.01939) or 1.0 (off)")
    if g.entropy_threshold < 0:
        raise ConfigError("algo.entropy_threshold", f"must be >= 0 (an entropy in nats), got {g.entropy_threshold}",
                          "use 0 (off) or a positive entropy")
    if g.entropy_top_quantile < 1 and g.entropy_threshold > 0:
        raise ConfigError("algo.entropy_threshold", f"{g.entropy_threshold} and algo.entropy_top_quantile="
                          f"{g.entropy_top_quantile} both set the entropy mask", "set one of them (the other at its "
                          "default: entropy_top_quantile=1.0 or entropy_threshold=0)")
    masking = g.entropy_top_quantile < 1 or g.entropy_threshold > 0
    why = fused_head_problem(g.importance_level, g.rollout_correction, g.rollout_correction_level, masking)
    if t.lm_head == "fused" and why is not None:
        raise ConfigError("train.lm_head", f"fused needs a loss separable per token, not with {why}",
                          "use train.lm_head=auto (fused where the loss allows) or blocked")


def _validate_dpo(cfg: Config) -> None:
    """algo=dpo trains on preference pairs, and only DPO reads them (recipes/dpo.py)."""
    is_dpo, pairs = isinstance(cfg.algo, DPOConfig), cfg.data.name in PREFERENCE_DATA
    if pairs and not is_dpo:
        raise ConfigError("data.name", f"{cfg.data.name} holds preference pairs, which only algo=dpo trains on",
                          f"add algo=dpo, or pick a math data set for algo={cfg.algo.name}")
    if not is_dpo:
        return
    if not pairs:
        raise ConfigError("data.name", f"algo=dpo needs preference pairs, not {cfg.data.name!r}",
                          "use data=preference data.path=<pairs.jsonl> (or data.hub_id=...), or data=preference_arithmetic")
    d = cfg.algo
    _choice("algo.loss", d.loss, DPO_LOSSES)
    _positive("algo.beta", d.beta)
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError("algo.label_smoothing", f"{d.label_smoothing} is outside [0, 0.5)",
                          "give the assumed share of flipped labels, e.g. algo.label_smoothing=0.1 (0: none)")
    if d.loss == "ipo" and d.label_smoothing:
        raise ConfigError("algo.label_smoothing", "IPO has no label smoothing", "set algo.label_smoothing=0 with algo.loss=ipo")
    if d.sft_weight < 0:
        raise ConfigError("algo.sft_weight", f"must be >= 0, got {d.sft_weight}", "use 0 for no SFT term")
    _positive("algo.ref_rows_per_shard", d.ref_rows_per_shard)
    if d.eval_pairs < 0:
        raise ConfigError("algo.eval_pairs", f"must be >= 0, got {d.eval_pairs}", "use 0 for no held-out scoring")
    if d.micro_batch_tokens < 0:
        raise ConfigError("algo.micro_batch_tokens", f"must be >= 0, got {d.micro_batch_tokens}",
                          "use 0 for train.micro_batch_size pairs per micro-batch, or a token budget such as 16384")
    if d.epochs < 0 or not 0 <= d.warmup_ratio < 1:
        raise ConfigError("algo.epochs", f"epochs={d.epochs}, warmup_ratio={d.warmup_ratio}",
                          "use algo.epochs >= 0 (0: train.max_steps counts) and algo.warmup_ratio in [0, 1)")
    if d.warmup_ratio and cfg.optim.warmup_steps:
        raise ConfigError("algo.warmup_ratio", f"{d.warmup_ratio} and optim.warmup_steps={cfg.optim.warmup_steps} both set "
                          "the warmup", "set optim.warmup_steps=0 to use the ratio, or algo.warmup_ratio=0")


def _validate_rollout(cfg: Config, world_size: int) -> None:
    r = cfg.rollout
    _choice("rollout.engine", r.engine, ("auto", "vllm", "hf"))
    _choice("rollout.sleep_level", str(r.sleep_level), ("1", "2"))
    if r.probe_tolerance < 0 or r.probe_prompts < 0 or cfg.hardware.vllm_kv_cache_gib < 0:
        raise ConfigError("rollout.probe_tolerance", f"probe_tolerance={r.probe_tolerance}, probe_prompts={r.probe_prompts}, "
                          f"hardware.vllm_kv_cache_gib={cfg.hardware.vllm_kv_cache_gib}", "use values >= 0 (0: automatic / off)")
    _positive("rollout.sync_bucket_mb", r.sync_bucket_mb)
    if not 0 < cfg.hardware.vllm_memory_share < 1:
        raise ConfigError("hardware.vllm_memory_share", f"{cfg.hardware.vllm_memory_share} is not a fraction in (0, 1)",
                          "set e.g. hardware.vllm_memory_share=0.3")
    if r.max_batch_size < 0:
        raise ConfigError("rollout.max_batch_size", f"must be >= 0, got {r.max_batch_size}", "use 0 for all sequences of a call")
    check_vllm_memory(cfg, world_size)


def _validate_eval(cfg: Config) -> None:
    """Every algorithm: task names first, then whether this recipe evaluates at all."""
    e = cfg.eval
    for task in e.tasks:
        _choice("eval.tasks", task, EVAL_TASKS)
    if e.tasks and not isinstance(cfg.algo, GRPOConfig):
        raise ConfigError("eval.tasks", f"evaluation during training runs in the GRPO recipe only (it needs the rollout "
                          f"engine), not in algo={cfg.algo.name}", "leave eval.tasks empty and evaluate the export "
                          "afterwards: python -m eval model=<run_dir>/hf tasks=[...]")
    if e.every_steps < 0 or e.limit < 0 or e.max_new_tokens < 0 or e.table_rows < 0:
        raise ConfigError("eval.every_steps", f"every_steps={e.every_steps}, limit={e.limit}, max_new_tokens={e.max_new_tokens}, "
                          f"table_rows={e.table_rows}", "use values >= 0 (0: default / off)")
    _positive("eval.k", e.k)
    _positive("eval.batch_size", e.batch_size)
    if e.data_dir and not os.path.isdir(os.path.expanduser(e.data_dir)):
        raise ConfigError("eval.data_dir", f"{e.data_dir!r} is not a directory", "point it at a folder holding gsm8k/ and math/, or leave it empty")
