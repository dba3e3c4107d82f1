"""Learning-rate schedules: linear warmup, then cosine or linear decay to a floor, or constant.

A pure function of the step (the multiplier applied to `optim.lr`), wrapped in `LambdaLR`, so a
resumed run only needs the step count to be back on the same curve.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from grpo_fsdp.config import OptimConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based).

    warmup: (step + 1) / warmup_steps, reaching 1 at the last warmup step; then over the
    remaining `total_steps - warmup_steps` steps: cosine 0.5 * (1 + cos(pi * t)) or linear (1 - t),
    rescaled to end at `min_ratio`, with t the fraction of decay done (0 at its first step).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if kind == "cosine" else 1.0 - t
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(lr_multiplier, warmup_steps=cfg.warmup_steps, total_steps=total_steps, kind=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
