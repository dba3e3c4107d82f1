"""Build a generation engine and tokenizer for a saved model (a local directory or a hub id).

`build_engine(name, model, tokenizer, ...)` goes through the training's engine factory
(`grpo_fsdp.rollout.factory.make_engine`): "hf" is the transformers engine, "vllm" the vLLM engine
(loading the directory's weights itself), "auto" vLLM when it imports and can serve the model.

Context: the transformers engine serves the model's whole `max_position_embeddings`; vLLM gets
`max_model_len` = the longest prompt + max_new_tokens the tasks need, at least 4096 and at most the
model's context (its KV cache must hold one such sequence). `check_budget` refuses, before anything
loads, a max_new_tokens that leaves no room for any prompt.

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


VLLM_MIN_MODEL_LEN = 4096  # vLLM's context in the evaluator, unless the tasks need more (and the model has it)


def model_context(model: str, tokenizer, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (`max_position_embeddings` of its config.json); None when it has none."""
    return getattr(hf_config(model_config(model, trust_remote_code), tokenizer, "sdpa"), "max_position_embeddings", None)


def check_budget(max_new_tokens: int, context: int | None, task: str, from_default: bool,
                 option: str = "max_new_tokens") -> None:
    """Refuse a generation budget that leaves no room for a prompt in the model's context (ConfigError naming
    `option`: the evaluator's max_new_tokens, or eval.max_new_tokens for the evaluation during training)."""
    if context is not None and max_new_tokens >= context:
        source = f"task {task}'s default" if from_default else f"the {option} option"
        raise ConfigError(option, f"{max_new_tokens} ({source}) leaves no room for a prompt in the model's "
                                  f"{context}-token context", f"set {option}=<below {context}, e.g. {context // 2}>")


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
    longest: int = 0,
) -> RolloutEngine:
    """An engine holding `model`'s weights, ready to `generate`.

    name: "auto", "hf" (transformers, any device) or "vllm".
    max_batch_size: sequences decoded together by the hf engine (None: all at once).
    longest: the longest prompt + max_new_tokens the caller needs (vLLM's max_model_len, see the module docstring).
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
                         max_model_len=min(getattr(conf, "max_position_embeddings", None) or VLLM_MIN_MODEL_LEN,
                                           max(VLLM_MIN_MODEL_LEN, longest)))
    if kind == "hf":
        engine.load_weights(full_state_dict(cfg, conf, seed=0).items())  # the CPU copy is freed on return
    return engine
