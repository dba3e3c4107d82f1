"""Rollout engines behind one protocol (`base.RolloutEngine`): `hf.HFEngine` on plain transformers; vLLM later."""

from grpo_fsdp.rollout.base import Completion, FinishReason, GenerationStats, RolloutEngine, SamplingConfig

__all__ = ["Completion", "FinishReason", "GenerationStats", "RolloutEngine", "SamplingConfig"]
