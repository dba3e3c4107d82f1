"""The memory plan as the start-up and `--dry-run` tables print it: one row per item of `estimate.MemoryEstimate`."""

from __future__ import annotations

from grpo_fsdp.config import Config
from grpo_fsdp.estimate import GIB, MemoryEstimate, gib, human_count, micro_batch_tokens


def plan_rows(est: MemoryEstimate, cfg: Config | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the plan, in print order (see `format_table`)."""
    rows = [("parameters", f"{human_count(est.params)} (trainable {human_count(est.trainable_params)})"),
            ("world size", str(est.world_size))]
    if est.base_weights or est.adapters:
        fmt = "4-bit NF4" if cfg is not None and cfg.hardware.load_in_4bit else "frozen"
        rows += [(f"base weights ({fmt})", gib(est.base_weights)), ("adapters (fp32 + gathered)", gib(est.adapters))]
    else:
        rows.append(("weights", gib(est.weights)))
    host = " (sharded state on the host: CPU offload)" if est.cpu_bytes else ""
    rows += [("gradients", gib(est.gradients) + (host if not est.gradients else "")),
             ("optimizer", gib(est.optimizer) + (host if not est.optimizer else ""))]
    what = "activations"
    if cfg is not None:
        tokens, _ = micro_batch_tokens(cfg)
        ac = "with" if cfg.hardware.activation_checkpointing else "without"
        what = f"activations ({cfg.train.micro_batch_size} seq, {tokens} tokens, {ac} checkpointing)"
    rows += [(what, gib(est.activations)), ("log-prob chunk (fp32 logits)", gib(est.logits))]
    if est.transient:
        rows.append(("transient (head grad / NF4 dequant)", gib(est.transient)))
    if est.reference:
        rows.append(("reference model", gib(est.reference)))
    if est.generation:  # GRPO: the engine generates while the trainer's gradients and activations are gone
        kv = f", KV cache {gib(est.kv_cache)}" if est.kv_cache else ""
        rows += [("rollout engine", f"{gib(est.engine)} (while generating{kv})"), ("training phase", gib(est.training)),
                 ("generation phase", gib(est.generation))]
    else:
        rows.append(("training phase", gib(est.training)))
    if est.loading:
        rows.append(("loading phase (full fp32 copy)", gib(est.loading)))
    if est.cuda_context:
        rows.append(("CUDA context", gib(est.cuda_context)))
    if est.host_runtime:
        rows.append(("host runtime (data, threads)", gib(est.host_runtime)))
    rows.append(("total per device", gib(est.total)))
    if est.cpu_bytes:
        rows.append(("offloaded to CPU per rank", gib(est.cpu_bytes)))
    return rows


def format_table(est: MemoryEstimate, gpu_memory_gib: float, cfg: Config | None = None) -> str:
    """The plan line by line in GiB, and whether it fits a device of `gpu_memory_gib` (if > 0)."""
    rows = plan_rows(est, cfg)
    width = max(len(k) for k, _ in rows)
    lines = ["memory plan (per device)", "-" * (width + 2 + max(len(v) for _, v in rows))]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    if gpu_memory_gib > 0:
        cap = gpu_memory_gib * GIB
        share = f"{est.total / cap:.0%} of {gpu_memory_gib:g} GiB"
        if est.total <= cap:
            lines.append(f"fits: yes ({share}; allocator fragmentation not counted)")
        else:
            tip = f"; try {', '.join(est.hints)}" if est.hints else ""
            lines.append(f"fits: NO ({share}){tip}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
