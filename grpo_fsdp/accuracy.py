"""Held-out accuracy of a saved model: greedy decoding on the transformers engine, graded by the
same math-verify grader as the training reward. The demo's before/after table uses it; the full
evaluator (GSM8K/MATH, per level and subject, pass@k, vLLM) builds on the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from grpo_fsdp.data.records import Example
from grpo_fsdp.data.templates import encode_prompt, render_prompt
from grpo_fsdp.rewards import RewardScorer
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.hf import HFEngine, stop_token_ids


@dataclass
class Accuracy:
    correct: int
    total: int
    mean_length: float

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else 0.0


def held_out_accuracy(model_dir: str | Path, examples: list[Example], template: str = "auto", max_new_tokens: int = 96,
                      batch_size: int = 64) -> Accuracy:
    """Greedy accuracy of the Hugging Face model in `model_dir` on `examples`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conf = AutoConfig.from_pretrained(model_dir)
    engine = HFEngine(conf, stop_token_ids(tokenizer, conf), tokenizer.pad_token_id, max_batch_size=batch_size)
    engine.load_weights(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items())
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, e.question, template)) for e in examples]
    completions = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    with RewardScorer(num_workers=1) as scorer:
        result = scorer.score(texts, [e.answer for e in examples], [len(c.token_ids) for c in completions], max_new_tokens)
    return Accuracy(sum(result.correct), len(examples), sum(len(c.token_ids) for c in completions) / max(1, len(completions)))
