"""Issue 17 item 3 on CUDA (`-m gpu`): the GRPO training kernels against the SDPA-mask and padded paths.

- FlexAttention: tests/test_gpu_flex.py (run last by gpu_check.sh: it hung once on the first GPU run).
- FA2 varlen (padding-free) equals the padded path in bf16 (FlashAttention-2 takes no fp32); skipped
  where flash-attn is not installed (the GPU machine of gpu_check.sh has none: the line says so).
`hardware.grpo_attention=flex` through FSDP2 in a GRPO step: benchmarks/grpo_step.py ran it on an H200
(results/gpu_check-2026-11-30-nvidia-h200.md), one shape, compiled once.
"""

import pytest
import torch
from test_flex_prefix import OWNER, case, compare, reference_fa2
from test_shared_prefix import PAD, policies, tiny_config
from transformers import Qwen2Config

from grpo_fsdp import varlen
from grpo_fsdp.data.sft import SFTSample, collate
from grpo_fsdp.grpo_attention import flash_attn_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_varlen_layout_on_cuda_with_the_reference_kernel(monkeypatch):
    """The layout on CUDA tensors (index arithmetic on the device), flash-attn or not."""
    monkeypatch.setattr(varlen, "_fa2", reference_fa2)
    compare("fa2_varlen", 2, 4, device="cuda", atol=1e-4, rel_grad=1e-4)


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed: FA2 varlen cannot run here")
def test_fa2_varlen_equals_padded_on_cuda_bf16():
    ours, ref = policies(tiny_config(Qwen2Config, 2))
    ours.grpo_attention = "fa2_varlen"
    ours, ref = ours.to("cuda", torch.bfloat16), ref.to("cuda", torch.bfloat16)
    sp, mask, w, prompts, completions = case(4)
    logp, _ = ours(shared_prefix=sp.to("cuda"), target_mask=mask.to("cuda"))
    rows = [SFTSample(prompts[o] + c, [False] * len(prompts[o]) + [True] * len(c)) for o, c in zip(OWNER, completions)]
    b = collate(rows, PAD)
    target = b.pop("loss_mask")[:, 1:]
    dense, _ = ref(**{k: v.cuda() for k, v in b.items()}, target_mask=target.cuda())  # [N, L-1]
    ref_logp = torch.stack([torch.cat([dense[n, len(prompts[o]) - 1 : len(prompts[o]) - 1 + len(c)],
                                       dense.new_zeros(mask.shape[1] - len(c))]) for n, (o, c) in enumerate(zip(OWNER, completions))])
    torch.testing.assert_close(logp.float(), ref_logp.float(), atol=5e-2, rtol=0)
    (logp * w.cuda()).sum().backward()
    (ref_logp * w.cuda()).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, r = p.grad.float(), ref_grads[name].grad.float()
        assert float((g - r).norm() / r.norm()) <= 5e-2, name  # bf16; a wrong mask is off by O(1)
