"""Which prompts each GRPO step takes: shuffled epochs (`data.curriculum=none`) or the SENT curriculum (`sent`).

Both are pure functions of (step, seed, ordering) (data/batching.py), so a resumed run takes exactly the
prompts of an uninterrupted one and every rank agrees without communication. With `sent` each step also
reports `curriculum/stage` (0-based) and `curriculum/batch_entropy` (the mean semantic entropy of its prompts).
"""

from __future__ import annotations

from collections.abc import Sequence

from grpo_fsdp.config import DataConfig
from grpo_fsdp.curriculum import cache
from grpo_fsdp.data.batching import curriculum_batch_indices, global_batch_indices


class PromptOrder:
    def __init__(self, cfg: DataConfig, questions: Sequence[str], lengths: Sequence[int], prompts_per_step: int, seed: int,
                 model_key: str | None):
        self.cfg, self.lengths, self.per_step, self.seed = cfg, list(lengths), prompts_per_step, seed
        self.summary = ""
        if cfg.curriculum == "sent":
            self.order, self.entropies, self.summary = cache.training_order(cfg.curriculum_file, questions, model_key,
                                                                           cfg.curriculum_drop_solved)
            self(0)  # too many stages for the prompts: one line now, not at step 1

    def __call__(self, step: int) -> tuple[list[int], dict[str, float]]:
        """(prompt positions of global step `step`, metrics to log)."""
        if self.cfg.curriculum != "sent":
            return global_batch_indices(self.lengths, self.per_step, step, self.seed, False), {}
        ids, stage = curriculum_batch_indices(self.order, self.cfg.curriculum_stages, self.per_step, step, self.seed)
        return ids, {"curriculum/stage": float(stage),
                     "curriculum/batch_entropy": sum(self.entropies[i] for i in ids) / len(ids)}
