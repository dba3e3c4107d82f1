"""Rollout engines behind one protocol (`base.RolloutEngine`): `hf.HFEngine` on plain transformers and
`vllm.VLLMEngine` on a colocated vLLM; `factory.make_engine` picks one (rollout.engine = auto | vllm | hf).

The factory and the vLLM engine are loaded on first use, so importing this package never imports vLLM.
"""

from grpo_fsdp.rollout.base import Completion, FinishReason, GenerationStats, RolloutEngine, SamplingConfig

_LAZY = {"make_engine": "factory", "resolve_engine_kind": "factory", "VLLMEngine": "vllm", "WeightSyncError": "probe"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"grpo_fsdp.rollout.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'grpo_fsdp.rollout' has no attribute {name!r}")


__all__ = ["Completion", "FinishReason", "GenerationStats", "RolloutEngine", "SamplingConfig",
           "VLLMEngine", "WeightSyncError", "make_engine", "resolve_engine_kind"]
