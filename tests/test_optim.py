"""build_optimizer: the fused AdamW where PyTorch has the kernel, with AdamW's update written out by hand."""

from __future__ import annotations

import torch

from grpo_fsdp.config import OptimConfig
from grpo_fsdp.optim import build_optimizer


def test_fused_adamw_first_step_by_hand():
    o = OptimConfig(lr=0.1, weight_decay=0.5, betas=[0.9, 0.95], eps=1e-8)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = build_optimizer([p, frozen], o)
    assert opt.defaults["fused"] is True and len(opt.param_groups[0]["params"]) == 1  # the frozen one is left out
    g = torch.tensor([0.5, -4.0, 0.0])
    p.grad = g.clone()
    opt.step()
    # step 1: m = (1-b1) g, v = (1-b2) g^2; bias-corrected m_hat = g, v_hat = g^2
    # p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
    want = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5) - 0.1 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(frozen.detach(), torch.ones(2))


def test_not_fused_where_no_kernel_exists():
    o = OptimConfig()
    assert build_optimizer([torch.nn.Parameter(torch.ones(2, device="meta"))], o).defaults["fused"] is False
