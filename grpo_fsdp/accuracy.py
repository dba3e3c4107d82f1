"""Held-out accuracy of a saved model: greedy decoding on the transformers engine, graded by the
same math-verify grader as the training reward. The demo's before/after table uses it.

A thin wrapper over the evaluator (`eval.evaluate`), kept for its small, stable signature; the
evaluator reports more (format rate, per level/subject, pass@k) for callers that want it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grpo_fsdp.data.records import Example
from grpo_fsdp.data.templates import INSTRUCTION
from grpo_fsdp.rewards import RewardScorer


@dataclass
class Accuracy:
    correct: int
    total: int
    mean_length: float
    per_problem: list[bool] = field(default_factory=list)  # correctness of each example, in order (for paired comparisons)

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else 0.0


def held_out_accuracy(model_dir: str | Path, examples: list[Example], template: str = "auto", max_new_tokens: int = 96,
                      batch_size: int = 64, instruction: str = INSTRUCTION) -> Accuracy:
    """Greedy accuracy of the Hugging Face model in `model_dir` on `examples`, on CPU in float32."""
    from eval.engines import build_engine, load_model_tokenizer
    from eval.evaluate import evaluate

    tokenizer = load_model_tokenizer(str(model_dir))
    engine = build_engine("hf", str(model_dir), tokenizer, device="cpu", dtype="float32", max_batch_size=batch_size)
    with RewardScorer(num_workers=1) as scorer:
        result = evaluate(engine, tokenizer, examples, template=template, instruction=instruction,
                          max_new_tokens=max_new_tokens, scorer=scorer, batch_size=batch_size)
    return Accuracy(result.correct, result.num_problems, result.mean_length, [row["correct"] for row in result.samples])
