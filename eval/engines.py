"""Build a generation engine and tokenizer for a saved model (a local directory or a hub id).

`build_engine(name, model, tokenizer, ...)` goes through the training's engine factory
(`grpo_fsdp.rollout.factory.make_engine`): "hf" is the transformers engine, "vllm" the vLLM engine
(loading the directory's weights itself), "auto" vLLM when it imports and can serve the model.

Loading reuses `grpo_fsdp.models` (tokenizer, config, full weights), so a missing directory or an
unreachable hub id ends in the same one-line `UserError` as in training.
"""

from __future__ import annotations

import os

import torch

from eval.options import ENGINES, check_model
from grpo_fsdp.config import ConfigError, ModelConfig
from grpo_fsdp.models import DTYPES, full_state_dict, hf_config, load_tokenizer
from grpo_fsdp.rollout.base import RolloutEngine


def model_config(model: str, trust_remote_code: bool) -> ModelConfig:
    """A ModelConfig for `model`, refusing a local-looking path that does not exist."""
    check_model(model)
    return ModelConfig(name="eval", path=os.path.expanduser(model), trust_remote_code=trust_remote_code)


def load_model_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer saved with `model` (pad token set to EOS when the model has none)."""
    return load_tokenizer(model_config(model, trust_remote_code))


def resolve_device(device: str) -> str:
    """'auto' -> cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"is {device} but no CUDA device is visible", "use device=cpu or device=auto")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown value {dtype!r}", f"choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_engine(
    name: str,
    model: str,
    tokenizer,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int | None = 64,
    trust_remote_code: bool = False,
) -> RolloutEngine:
    """An engine holding `model`'s weights, ready to `generate`.

    name: "auto", "hf" (transformers, any device) or "vllm".
    max_batch_size: sequences decoded together by the hf engine (None: all at once).
    """
    from grpo_fsdp.rollout.factory import make_engine, resolve_engine_kind

    if name not in ENGINES:
        raise ConfigError("engine", f"unknown engine {name!r}", f"choose one of {', '.join(ENGINES)}")
    cfg = model_config(model, trust_remote_code)
    dev = resolve_device(device)
    conf = hf_config(cfg, tokenizer, "sdpa")
    kind = resolve_engine_kind(name, hf_conf=conf, device=dev)
    # vLLM reads the directory (or hub id) itself; on CPU it gets a fixed KV cache, not a share of host RAM
    engine = make_engine(kind, hf_conf=conf, tokenizer=tokenizer, model_dir=cfg.path, device=dev,
                         dtype=resolve_dtype(dtype, dev), max_batch_size=max_batch_size,
                         kv_cache_memory_bytes=(1 << 30) if dev == "cpu" else None, gpu_memory_utilization=0.85,
                         max_model_len=min(getattr(conf, "max_position_embeddings", 4096), 4096))
    if kind == "hf":
        engine.load_weights(full_state_dict(cfg, conf, seed=0).items())  # the CPU copy is freed on return
    return engine
