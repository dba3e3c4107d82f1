"""QLoRA rollouts dequantize each NF4 base once per rollout (lora.dense_nf4_bases), when that fits in memory.

The same tokens and log-probs bit for bit as dequantizing at every decode step (linear_nf4), the dense copies freed
when the rollout ends, their size counted by hand, and the engine keeping per-step dequantization when a quarter of
the free memory would not hold them."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL

from grpo_fsdp import distributed
from grpo_fsdp.cli import compose
from grpo_fsdp.lora import LoRALinear, dense_nf4_bases, lora_modules
from grpo_fsdp.models import build_policy, load_tokenizer
from grpo_fsdp.rollout import shared as shared_mod
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.factory import make_engine

pytestmark = pytest.mark.usefixtures("one_thread")
QLORA = ["hardware.lora.enabled=true", "hardware.lora.rank=4", "hardware.lora.alpha=8", "hardware.load_in_4bit=true"]
PROMPTS = [[5, 9, 14, 20, 7, 3, 40, 41], [8, 2, 2, 11, 60]]


def test_dense_bases_sample_as_per_step_dequantization_and_are_freed(monkeypatch):
    pytest.importorskip("torchao")
    cfg = compose([*SMALL, *QLORA])
    d = distributed.init("cpu")
    try:
        tok = load_tokenizer(cfg.model)
        policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, 0, 64)
        with torch.no_grad():  # adapters after some training
            gen = torch.Generator().manual_seed(5)
            for _, m in lora_modules(policy):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)
        lines = []
        engine = make_engine("hf", hf_conf=conf, tokenizer=tok, policy=policy, log=lines.append)
        a = cfg.model.arch  # the default targets: q, k, v, o of every layer, fp32
        kv = a.hidden_size // a.num_heads * a.num_kv_heads
        per_layer = a.hidden_size * (2 * a.hidden_size + 2 * kv)  # q, o: h x h; k, v: kv x h
        nf4_layers = [m for _, m in lora_modules(policy) if type(m.weight).__name__ == "NF4Tensor"]
        assert len(nf4_layers) == 4 * a.num_layers
        assert engine.dense_nf4_bytes == a.num_layers * per_layer * 4
        assert engine.dense_nf4 and "dequantized once per rollout" in lines[-1]

        sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=12, seed=7)
        dense = engine.generate(PROMPTS, sampling)
        assert all(m._dense is None and not m.dense_base for m in nf4_layers)  # freed with the rollout
        engine.dense_nf4 = False
        per_step = engine.generate(PROMPTS, sampling)
        assert [c.token_ids for c in dense] == [c.token_ids for c in per_step]
        assert [c.logprobs for c in dense] == [c.logprobs for c in per_step]  # bit for bit

        x = torch.randn(5, a.hidden_size)
        layer: LoRALinear = nf4_layers[0]
        want = layer(x)
        with dense_nf4_bases(policy):
            got = layer(x)
            assert layer._dense is not None and layer._dense.dtype == x.dtype
        assert torch.equal(got, want) and layer._dense is None

        monkeypatch.setattr(shared_mod, "_free_bytes", lambda device: 3 * engine.dense_nf4_bytes)  # < 4x: too little
        lines.clear()
        small = make_engine("hf", hf_conf=conf, tokenizer=tok, policy=policy, log=lines.append)
        assert not small.dense_nf4 and "at every decode step" in lines[-1]
    finally:
        distributed.shutdown()


def test_the_memory_plan_counts_the_dense_bases_where_the_engine_holds_them():
    """test_plan_estimate's hand-written arch (2 layers, h 8, kv 4) with q, k, v, o in NF4: 64 + 32 + 32 + 64 = 192 base
    weights a layer, 384 in all, dequantized to bf16 (h100x2) for a rollout: 768 bytes beside the gathered policy."""
    from test_plan_estimate import grpo

    from grpo_fsdp import estimate

    assert estimate.DENSE_NF4_SHARE == shared_mod.DENSE_NF4_SHARE  # the plan decides as the engine does
    lora = ["hardware.lora.enabled=true", "hardware.lora.rank=2", "hardware.load_in_4bit=true", "rollout.engine=hf",
            "hardware.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]  # fmt: skip

    def plan(gib):
        return estimate.estimate_memory(grpo(*lora, f"hardware.gpu_memory_gib={gib}"), world_size=2)

    roomy, full, unsized = plan(80), plan(0.5), plan(0)  # 0.5 GiB: the CUDA context alone, nothing free
    assert roomy.engine - full.engine == 768 and roomy.generation - full.generation == 768
    assert unsized.engine == roomy.engine  # no device size: counted
    assert roomy.training == full.training  # freed when the rollout ends
    assert any("dequantized to bfloat16 once per rollout" in n for n in roomy.notes)
    assert any("dequantized at every decode step" in n for n in full.notes)
    plain = estimate.estimate_memory(grpo(*lora[:2], *lora[3:], "hardware.gpu_memory_gib=80"), world_size=2)
    assert not any("dequantized" in n for n in plain.notes)  # no NF4 base, nothing to dequantize
