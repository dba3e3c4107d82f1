"""Which GRPO losses the fused LM head can run (algorithms/token_loss.py): those separable per token. No torch
import, so validation can refuse `train.lm_head=fused` before anything loads."""

from __future__ import annotations


def fused_head_problem(importance_level: str, rollout_correction: str, correction_level: str, entropy_mask: bool) -> str | None:
    """Why this GRPO loss cannot run through the fused head (one phrase), or None when it can."""
    if importance_level != "token":
        return f"algo.importance_level={importance_level} (a sequence ratio reads the whole completion)"
    if rollout_correction != "none" and correction_level != "token":
        return f"algo.rollout_correction_level={correction_level} (one weight per completion)"
    if entropy_mask:
        return "the entropy mask (its threshold is known only after every forward of the step)"
    return None
