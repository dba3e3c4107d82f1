"""Which rollout prompts fit: at most `data.max_prompt_length` tokens, and room left in the model's
context (`max_position_embeddings`) for `algo.max_new_tokens` more. A prompt that does not fit is
skipped (not truncated: a cut question is a different question, graded against the old answer) and
counted in one line, the way SFT counts its long prompts (`data/sft.py`). When too few remain, the
error names the limit that removed them, not a batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpo_fsdp.cli import UserError


@dataclass(frozen=True)
class PromptFit:
    kept: list[int]  # indices of the prompts that fit, in order
    total: int
    over_prompt_limit: int  # longer than max_prompt_length
    over_context: int  # within max_prompt_length, but prompt + max_new_tokens > context
    longest: int  # the longest prompt seen, in tokens
    summary: str | None  # the one counted line, or None when every prompt fits


def fit_prompts(lengths: Sequence[int], max_prompt_length: int, max_new_tokens: int, context: int | None,
                need: int = 1) -> PromptFit:
    """Keep prompts of at most `max_prompt_length` tokens whose `max_new_tokens` continuation fits in
    `context` (None: no limit known). Raises UserError when fewer than `need` (algo.prompts_per_step) fit."""
    room = max_prompt_length if context is None else min(max_prompt_length, context - max_new_tokens)
    kept = [i for i, n in enumerate(lengths) if n <= room]
    over_prompt = sum(n > max_prompt_length for n in lengths)
    over_context = len(lengths) - len(kept) - over_prompt
    longest = max(lengths, default=0)
    parts = []
    if over_prompt:
        parts.append(f"{over_prompt} longer than data.max_prompt_length={max_prompt_length} tokens")
    if over_context:
        parts.append(f"{over_context} leaving no room for algo.max_new_tokens={max_new_tokens} in the model's "
                     f"{context}-token context")
    summary = (f"data: skipped {len(lengths) - len(kept)} of {len(lengths)} prompts: {', '.join(parts)} (longest {longest})"
               if parts else None)
    if len(kept) < need:
        raise UserError(_too_few(lengths, kept, need, max_prompt_length, max_new_tokens, context, over_prompt, over_context))
    return PromptFit(kept, len(lengths), over_prompt, over_context, longest, summary)


def _too_few(lengths, kept, need, max_prompt_length, max_new_tokens, context, over_prompt, over_context) -> str:
    shortest = min(lengths, default=0)
    head = f"data: {len(kept)} of {len(lengths)} prompts fit, fewer than algo.prompts_per_step={need}"
    if context is not None and shortest >= context and not kept:
        return (f"{head}: every prompt (shortest {shortest} tokens) fills the model's {context}-token context "
                "(max_position_embeddings) by itself; shorten the prompts (e.g. data.instruction='') or use a model "
                "with a longer context")
    if context is not None and context - max_new_tokens < min(shortest, max_prompt_length) and not kept:
        return (f"{head}: every prompt (shortest {shortest} tokens) plus algo.max_new_tokens={max_new_tokens} exceeds "
                f"the model's {context}-token context (max_position_embeddings); lower algo.max_new_tokens to at most "
                f"{max(context - shortest, 0)}")
    if over_prompt >= over_context:
        return (f"{head}: {over_prompt} are longer than data.max_prompt_length={max_prompt_length} tokens (longest "
                f"{max(lengths, default=0)}); raise data.max_prompt_length (and data.max_length above it), or lower "
                "algo.prompts_per_step")
    return (f"{head}: {over_context} leave no room for algo.max_new_tokens={max_new_tokens} in the model's {context}-token "
            "context (max_position_embeddings); lower algo.max_new_tokens, or lower algo.prompts_per_step")
