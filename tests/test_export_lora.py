"""The PEFT-format adapter export (grpo_fsdp/export.py) against PEFT itself, in one process: a directory written
from our LoRA layers loads with `peft.PeftModel.from_pretrained(base, dir)` and gives our model's logits; the
offline merge of a checkpoint's adapters equals the in-training merge, NF4 base included."""

from __future__ import annotations

import json

import pytest
import torch
from test_lora import IDS, tiny
from transformers import AutoModelForCausalLM

from grpo_fsdp.config import HardwareConfig, LoraConfig
from grpo_fsdp.export import PEFT_PREFIX, merge_into, write_adapter_dir
from grpo_fsdp.lora import LoRALinear, adapter_state_dict, apply_lora, merge_adapters, peft_adapter_config
from grpo_fsdp.quant import quantize_base_nf4

pytestmark = pytest.mark.usefixtures("one_thread")


def _tuned(cfg: LoraConfig, nf4: bool = False):
    model = tiny()
    apply_lora(model, cfg)
    if nf4:
        quantize_base_nf4(model, HardwareConfig())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.2)
    return model


def test_peft_loads_the_adapter_directory_and_gives_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = tmp_path / "base"
    tiny().save_pretrained(base_dir)
    cfg = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = _tuned(cfg)
    out = write_adapter_dir(adapter_state_dict(model), peft_adapter_config(model, cfg, str(base_dir)), tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    from safetensors.torch import load_file

    keys = set(load_file(out / "adapter_model.safetensors"))
    assert PEFT_PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 3 * 2
    with torch.no_grad():
        ours, theirs = model(IDS).logits, loaded(input_ids=IDS).logits
    assert (ours - tiny()(IDS).logits).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_offline_merge_equals_the_training_merge(nf4):
    """export.merge_into (from a checkpoint's adapters and the base's own weights; NF4 quantized and dequantized
    again the same way) gives the tensors lora.merge_adapters gives from the live model."""
    if nf4:
        pytest.importorskip("torchao")
    cfg = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["all-linear"])
    model = _tuned(cfg, nf4)
    live = dict(merge_adapters(model))
    offline = merge_into(tiny().state_dict(), adapter_state_dict(model), 8.0 / 4, torch.float32 if nf4 else None)
    assert set(offline) == set(live)
    for k, value in live.items():
        torch.testing.assert_close(offline[k], value, rtol=0, atol=1e-6, msg=k)
