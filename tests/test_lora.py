"""LoRA (grpo_fsdp/lora.py) on a tiny Qwen2 model, in one process: the layer's arithmetic and gradients
against hand-derived formulas, B = 0 gives the base model exactly, a step moves only adapters, frozen
weights get no gradient, adapters_disabled is the base model, and the merge is the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config

from grpo_fsdp.config import LoraConfig
from grpo_fsdp.lora import (
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    merge_adapters,
    target_names,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conf = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()


IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [9, 7, 9, 3, 2, 38, 4, 6]])


def test_targets_default_qkvo_and_all_linear():
    model = tiny()
    qkvo = target_names(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(qkvo) == 2 * 4 and qkvo[0] == "model.layers.0.self_attn.q_proj"
    every = target_names(model, ["all-linear"])
    assert len(every) == 2 * 7  # q k v o gate up down per block; never lm_head (not inside the blocks)
    assert not any("lm_head" in n for n in every)
    with pytest.raises(ValueError, match="selects no linear"):
        apply_lora(model, LoraConfig(enabled=True, target_modules=["c_attn"]))


def test_lora_layer_output_and_gradients_match_the_formulas():
    """y = x W^T + b + s x A^T B^T; with L = sum(y * G): dL/dB = s G^T (x A^T), dL/dA = s (G B)^T x, written out here."""
    torch.manual_seed(1)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.0)  # s = 2
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(5, 3))
    x, g = torch.randn(4, 6), torch.randn(4, 5)
    w, b, a, bb = base.weight.detach(), base.bias.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    y = layer(x)
    torch.testing.assert_close(y, x @ w.T + b + 2.0 * (x @ a.T) @ bb.T, rtol=0, atol=1e-6)
    (y * g).sum().backward()
    torch.testing.assert_close(layer.lora_B.weight.grad, 2.0 * g.T @ (x @ a.T), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, 2.0 * (g @ bb).T @ x, rtol=0, atol=1e-5)
    assert base.weight.grad is None and base.bias.grad is None  # frozen


def test_b_zero_gives_the_base_logits_exactly_and_a_step_moves_only_adapters():
    model = tiny()
    before = model(IDS).logits
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8.0))
    assert all(m.lora_A.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))  # A is random
    assert torch.equal(model(IDS).logits, before)  # B = 0: exactly the base model, bit for bit
    params = trainable_parameters(model)
    assert len(params) == 2 * 8 and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    logp = model(IDS).logits.log_softmax(-1)[:, :-1].gather(-1, IDS[:, 1:, None])
    (-logp.mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if ".lora_" not in n)  # no gradient reaches a frozen weight
    assert all(grads[n].abs().sum() > 0 for n in grads if ".lora_B." in n)
    assert all(torch.equal(grads[n], torch.zeros_like(grads[n])) for n in grads if ".lora_A." in n)  # dL/dA ∝ B = 0
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed == {k for k in after if ".lora_B." in k}  # only the Bs moved (the As had zero gradients)
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)  # base weights bit-identical, keys unchanged
    assert not torch.equal(model(IDS).logits, before)


def test_adapters_disabled_is_the_base_model_and_merge_is_the_same_function():
    model = tiny()
    base_logits = model(IDS).logits
    apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["all-linear"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
    tuned = model(IDS).logits
    assert (tuned - base_logits).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(model(IDS).logits, base_logits)
    assert torch.equal(model(IDS).logits, tuned)  # restored on exit
    merged = dict(merge_adapters(model))
    assert not any(".lora_" in k for k in merged) and set(merged) == set(tiny().state_dict())
    q = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"],
                               q.weight + 2.0 * q.lora_B.weight @ q.lora_A.weight, rtol=0, atol=1e-6)
    plain = tiny()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(IDS).logits, tuned, rtol=0, atol=2e-5)
    adapters = adapter_state_dict(model)
    assert len(adapters) == 2 * 7 * 2 and adapters["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 64)
