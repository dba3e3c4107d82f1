"""SFT tokenization: prompt + completion ids with a loss mask, and right-padding collation.

Prompt and completion are tokenized separately and their ids concatenated. Tokenizing the
joined string instead could merge tokens across the boundary (BPE), leaving no exact place
where the targets begin; separate tokenization makes the mask exact, at the cost of ids that
can differ slightly from tokenizing the whole text. Generation sees the same split (the model
continues the prompt's ids), so training matches how the policy is sampled.

Prompts longer than max_prompt_length are dropped (and counted in one stderr line); completions
are cut so that prompt + completion <= max_length. A cut completion loses its EOS, which is
right: the model should not learn to stop where the text was truncated.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grpo_fsdp.cli import UserError
from grpo_fsdp.data.records import Example
from grpo_fsdp.data.templates import INSTRUCTION, bos_prefix, completion_text, render_prompt


@dataclass
class SFTSample:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target


def tokenize_sft(
    examples: Sequence[Example],
    tokenizer: Any,
    template: str,
    max_prompt_length: int,
    max_length: int,
    loss_on_prompt: bool = False,
    instruction: str = INSTRUCTION,
) -> list[SFTSample]:
    """One SFTSample per example whose prompt fits; masks cover completion tokens (EOS included)."""
    prompts = [render_prompt(tokenizer, ex.question, template, instruction) for ex in examples]
    completions = [completion_text(ex, tokenizer, template) for ex in examples]
    # Batched calls: the Rust tokenizer parallelises them, which matters for 7,500 MATH rows.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []

    samples, too_long, longest, truncated = [], 0, 0, 0
    for text, p_ids, c_ids in zip(prompts, prompt_ids, completion_ids):
        p_ids = bos_prefix(tokenizer, text) + list(p_ids)
        room = max_length - len(p_ids)
        if len(p_ids) > max_prompt_length or room <= 0:
            too_long += 1
            longest = max(longest, len(p_ids))
            continue
        if len(c_ids) > room:
            truncated += 1
            c_ids = c_ids[:room]
        samples.append(SFTSample(input_ids=p_ids + list(c_ids), loss_mask=[loss_on_prompt] * len(p_ids) + [True] * len(c_ids)))

    if too_long or truncated:
        print(
            f"data: dropped {too_long} of {len(examples)} examples with prompts over data.max_prompt_length="
            f"{max_prompt_length} tokens (longest {longest}); cut {truncated} completions to data.max_length={max_length}",
            file=sys.stderr,
        )
    if examples and not samples:
        raise UserError(
            f"data: every one of {len(examples)} prompts is longer than data.max_prompt_length={max_prompt_length} "
            f"tokens (longest {longest}); raise data.max_prompt_length (and data.max_length above it)"
        )
    return samples


def collate(samples: Sequence[SFTSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids/attention_mask [B, L] long, loss_mask [B, L] bool."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)  # [B, L]
    loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)  # [B, L]
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(s.loss_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
