"""Supervised fine-tuning loss: next-token negative log-likelihood on target tokens.

The sum over this micro-batch's target tokens is divided by `global_tokens`, the number of target
tokens in the whole optimizer step summed over micro-batches and ranks. Gradients accumulated over
micro-batches and SUM-reduced over ranks then equal the gradient of the step's mean token loss,
whatever the micro-batch size or world size (a per-micro-batch mean would weight short
micro-batches more heavily).
"""

from __future__ import annotations

import torch


def sft_loss(token_logprobs: torch.Tensor, target_mask: torch.Tensor, global_tokens: float) -> torch.Tensor:
    """token_logprobs [B, L-1] fp32, target_mask [B, L-1] bool, global_tokens > 0 -> scalar."""
    return -(token_logprobs * target_mask).sum() / global_tokens
