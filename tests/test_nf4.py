"""The NF4 base (grpo_fsdp/quant.py, torchao): the round-trip error within NF4's bound, derived here from the
code book and the double-quantized scales; the scaler-block rule by hand; a QLoRA forward and its adapter
gradients against the same model with the dequantized weights in fp32."""

from __future__ import annotations

import pytest
import torch
from test_lora import IDS, tiny

from grpo_fsdp.config import HardwareConfig, LoraConfig
from grpo_fsdp.lora import LoRALinear, apply_lora
from grpo_fsdp.quant import BLOCK, NF4_LEVELS, nf4_bytes, nf4_problem, quantize_base_nf4, scaler_block, to_nf4

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")

# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E), as torchao stores it
LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
                       0.4407, 0.5626, 0.7230, 1.0])


def test_scaler_block_by_hand():
    # 64x64 = 4096 values = 64 blocks; 8 shards of whole scale blocks: 64 / 8 = 8 blocks per shard -> 8
    assert scaler_block(64 * 64) == 8
    assert scaler_block(32 * 64) == 4  # 32 blocks -> 4 per shard
    assert scaler_block(1536 * 1536) == 256  # Qwen2.5-1.5B q_proj: 36864 blocks, 256 x 8 divides them
    assert scaler_block(64 * 7) == 0  # 448 values: not 64 x 8
    assert nf4_problem("w", torch.Size([64, 64]), 2) is None
    assert "3 ranks" in nf4_problem("w", torch.Size([64, 64]), 3)


def test_nf4_round_trip_error_within_the_bound():
    """|w - deq(q(w))| <= absmax_block * g + d per value: g = half the widest gap between neighbouring levels (the
    nearest level is never further), d = the largest error of a double-quantized scale (int8 over the scale block's
    range around the mean: half a step, max|s - mean| / 256 with torchao's 256 / (2 absmax) factor), times |level| <= 1."""
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    w[3, 7] = 0.3  # an outlier widens its block's scale
    deq = to_nf4(w).get_original_weight()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    g = float((LEVELS[1:] - LEVELS[:-1]).max()) / 2  # 0.1385 (between 0.7230 and 1.0)
    absmax = w.reshape(-1, BLOCK).abs().amax(dim=1)  # [n_blocks]
    sb = scaler_block(w.numel())
    centred = (absmax - absmax.mean()).reshape(-1, sb)
    d = centred.abs().amax(dim=1, keepdim=True).expand(-1, sb).reshape(-1) / 256  # [n_blocks]
    bound = (absmax * g + d)[:, None].expand(-1, BLOCK).reshape(w.shape)
    err = (w - deq).abs()
    assert bool((err <= bound + 1e-7).all()), float((err - bound).max())
    assert float((err / bound).max()) > 0.5  # the bound is not loose by orders of magnitude
    # an NF4 weight is 4 bits a value plus one int8 scale per block and one factor per scale block
    q = to_nf4(w)
    assert nf4_bytes(torch.nn.Linear(1, 1)) == 0
    assert q.quantized_data.numel() == w.numel() // 2 and q.quantized_scalers.numel() == w.numel() // BLOCK


def test_our_nf4_is_torchaos_for_fp32_weights():
    """quant.to_nf4 finds the nearest level by bucketize (faster); from fp32 weights it stores torchao's bytes."""
    from torchao.quantization import to_nf4 as torchao_to_nf4

    torch.manual_seed(1)
    w = torch.randn(128, 256) * 0.05
    ours, theirs = to_nf4(w), torchao_to_nf4(w, BLOCK, scaler_block(w.numel()))
    for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.get_original_weight(), theirs.get_original_weight())
    assert torch.equal(LEVELS, torch.tensor(NF4_LEVELS))


def _dequantized_copy(model, cfg: LoraConfig):
    """The same model with each NF4 weight replaced by its dequantized fp32 values (plain tensors). Not a
    deepcopy: torchao's NF4 clone re-quantizes with its default block sizes."""
    plain = tiny()
    apply_lora(plain, cfg)
    for (name, m), r in zip(((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)),
                            (m for m in plain.modules() if isinstance(m, LoRALinear)), strict=True):
        r.weight = torch.nn.Parameter(m.weight.get_original_weight().clone(), requires_grad=False)
        r.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("lora_")}, strict=False)
    return plain


def test_qlora_forward_and_adapter_gradients_match_the_dequantized_fp32_model():
    model = tiny()
    base_logits = model(IDS).logits
    cfg = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["all-linear"])
    apply_lora(model, cfg)
    assert quantize_base_nf4(model, HardwareConfig()) == 2 * 7
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "NF4Tensor"
    assert nf4_bytes(model) > 0
    reference = _dequantized_copy(model, cfg)
    out, ref = model(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - base_logits).abs().max() > 1e-3  # the 4-bit model with adapters is not the fp32 base
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-7, msg=name)
        else:
            assert p.grad is None, name
