"""Prompt and completion text, and how a prompt becomes token ids.

Two templates, chosen by model.template:
  chat   the tokenizer's own chat template, one user turn, generation prompt appended:
             <|im_start|>user\\n{question}{INSTRUCTION}<|im_end|>\\n<|im_start|>assistant\\n
         the completion is the bare solution followed by the EOS token text.
  plain  for base models without a chat template:
             Question: {question}{INSTRUCTION}\\nAnswer:
         the completion starts with one space (" {solution}<eos>"), the way a base model
         continues "Answer:", so BPE tokenizers see the usual " word" tokens.
  auto   chat if the tokenizer has a chat template, else plain.

The SFT targets, the rollout prompts and evaluation all go through these functions, so prompt and
completion always meet at the same boundary.
"""

from __future__ import annotations

from typing import Any

from grpo_fsdp.config import INSTRUCTION  # the default of data.instruction
from grpo_fsdp.data.records import Example

TEMPLATES = ("auto", "chat", "plain")


def resolve_template(tokenizer: Any, template: str) -> str:
    """'chat' or 'plain' for a model.template setting ('auto' looks at the tokenizer)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.template=chat but the tokenizer has no chat template; use model.template=plain or auto")
    return template


def render_prompt(tokenizer: Any, question: str, template: str, instruction: str = INSTRUCTION) -> str:
    """The prompt text for one question (ends where the model's answer begins).

    instruction: appended to the question (`data.instruction`; default: reason step by step and box
    the answer). The demo's byte-level tiny model drops it: 70 bytes between the operands and the
    answer make copying them much harder to learn in a CPU-minute budget.
    """
    if resolve_template(tokenizer, template) == "chat":
        messages = [{"role": "user", "content": question + instruction}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"Question: {question}{instruction}\nAnswer:"


def completion_text(example: Example, tokenizer: Any, template: str = "auto") -> str:
    """The target continuation of `render_prompt`: solution + EOS text (leading space if plain)."""
    lead = "" if resolve_template(tokenizer, template) == "chat" else " "
    return lead + example.solution + (tokenizer.eos_token or "")


def bos_prefix(tokenizer: Any, text: str) -> list[int]:
    """[bos_id] for tokenizers that add a BOS by default (Llama-style) when text lacks it, else []."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and getattr(tokenizer, "add_bos_token", False) and not text.startswith(bos):
        return [tokenizer.bos_token_id]
    return []


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt.

    add_special_tokens=False because a chat template already writes its special tokens as text
    (encoding with them would double a BOS); `bos_prefix` restores the BOS a plain prompt needs.
    """
    return bos_prefix(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]
