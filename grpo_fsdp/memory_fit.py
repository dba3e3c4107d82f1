"""A memory plan over the device (`estimate.py`'s plan against `hardware.gpu_memory_gib`): the largest items, single
changes that lower the plan without changing what is learned, a greedy search for overrides that fit, and the
one-line start-up refusal that names both (`validation.py`)."""

from __future__ import annotations

import copy

from grpo_fsdp.config import Config, ConfigError, GRPOConfig
from grpo_fsdp.estimate import GIB, MemoryEstimate, estimate_memory, gib


def largest_items(est: MemoryEstimate, k: int = 3) -> list[tuple[str, int]]:
    """The k largest items of the peak phase, largest first: what a refusal names."""
    items = {"activations": est.activations, "log-prob chunk": est.logits, "gradients": est.gradients,
             "optimizer": est.optimizer, "reference model": est.reference, "transient": est.transient}
    if est.base_weights or est.adapters:
        items.update({"base weights": est.base_weights, "adapters": est.adapters})
    else:
        items["weights"] = est.weights
    if est.generation > est.training:  # the generation phase is the peak: the engine and its cache
        items = {"rollout engine": est.engine - est.kv_cache, "KV cache": est.kv_cache, "weights": est.weights,
                 "optimizer": est.optimizer, "reference model": est.reference}
    return sorted(((n, v) for n, v in items.items() if v > 0), key=lambda x: -x[1])[:k]



def _set(cfg: Config, dotted: str, value) -> Config:
    """A copy of `cfg` with one dotted field replaced (the typed dataclasses, not Hydra)."""
    out = copy.deepcopy(cfg)
    *path, leaf = dotted.split(".")
    node = out
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)
    return out


def _moves(cfg: Config, world_size: int) -> list[tuple[str, object]]:
    """Single changes that lower the plan without changing what is learned (same batch, same lengths), then
    (last) shorter completions. A micro-batch is halved only while it still divides the per-rank batch."""
    hw, t, moves = cfg.hardware, cfg.train, []
    if not hw.activation_checkpointing:
        moves.append(("hardware.activation_checkpointing", True))
    m = t.micro_batch_size
    if m > 1 and m % 2 == 0 and t.global_batch_size % (m // 2 * world_size) == 0:
        moves.append(("train.micro_batch_size", m // 2))
    if t.logprob_chunk_size >= 128:
        moves.append(("train.logprob_chunk_size", t.logprob_chunk_size // 2))
    if not hw.cpu_offload:
        moves.append(("hardware.cpu_offload", True))
    if not hw.lora.enabled:
        moves.append(("hardware.lora.enabled", True))
    elif not hw.load_in_4bit:
        moves.append(("hardware.load_in_4bit", True))
    if not hw.reshard_after_forward:
        moves.append(("hardware.reshard_after_forward", True))
    if isinstance(cfg.algo, GRPOConfig):
        rows = cfg.rollout.max_batch_size or cfg.algo.prompts_per_step // world_size * cfg.algo.group_size
        if rows > 1 and cfg.rollout.engine != "vllm":  # sequences the transformers engine decodes together: its KV cache
            moves.append(("rollout.max_batch_size", rows // 2))
    return moves


def fitting_overrides(cfg: Config, world_size: int, cap_bytes: float, max_rounds: int = 24) -> tuple[list[str], int] | None:
    """Overrides (key=value) that bring the plan under `cap_bytes`, found greedily (each round takes the single
    move that lowers the total most), and the plan's total with them; None when no combination fits."""
    chosen: dict[str, object] = {}
    current, total = cfg, estimate_memory(cfg, world_size).total
    for _ in range(max_rounds):
        if total <= cap_bytes:
            return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in chosen.items()], total
        tried = [(estimate_memory(c := _set(current, k, v), world_size).total, k, v, c) for k, v in _moves(current, world_size)]
        if not tried or (best := min(tried, key=lambda x: x[0]))[0] >= total:
            return None
        total, key, value, current = best
        chosen[key] = value
    return None


def check_fits(cfg: Config, world_size: int) -> None:
    """Refuse (`ConfigError`, one line) a CUDA plan over `hardware.gpu_memory_gib`: the largest items and an
    override that fits. Nothing to check on a CPU device or without a device size."""
    hw = cfg.hardware
    if hw.device != "cuda" or hw.gpu_memory_gib <= 0:
        return
    cap = hw.gpu_memory_gib * GIB
    est = estimate_memory(cfg, world_size)
    if est.total <= cap:
        return
    largest = ", ".join(f"{name} {gib(v)}" for name, v in largest_items(est))
    problem = f"the memory plan needs {gib(est.total)} per device, over {hw.gpu_memory_gib:g} GiB (largest: {largest})"
    found = fitting_overrides(cfg, world_size, cap)
    if found:
        fix = f"try {' '.join(found[0])} (plan {gib(found[1])})"
    else:
        fix = "lower algo.group_size, algo.max_new_tokens or data.max_prompt_length"
    raise ConfigError("hardware.gpu_memory_gib", problem,
                      f"{fix}, or set hardware.gpu_memory_gib to the device's real size (dry_run=true prints the plan)")
