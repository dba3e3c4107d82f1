"""Issue 14 item 4: under LoRA the transformers engine generates with the trainer's own modules
(grpo_fsdp/rollout/shared.py). A LoRA policy built as the trainer builds it (plain fp32, FSDP2-wrapped on one
process, NF4 base), its adapters moved (B != 0): the shared engine samples the same tokens with the same
log-probs as the copy engine fed the merged weights W + (alpha/r) B A, for the same seed; it owns no parameter;
afterwards the policy is in train mode with its dropout active and its parameters (DTensor shards included)
untouched; there is nothing to sync, and the first-sync probe passes. The memory plan counts the policy gathered
for the rollout (FSDP2) instead of the engine's copy, and nothing where FSDP2 does not wrap the policy."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL
from test_plan_estimate import KV, LAYER, ROOT, P, grpo
from test_plan_estimate import SMALL as PLAN_SMALL
from torch.distributed.tensor import DTensor

from grpo_fsdp import distributed
from grpo_fsdp.cli import compose
from grpo_fsdp.estimate import estimate_memory, fsdp_wraps
from grpo_fsdp.lora import adapters_disabled, lora_modules, merge_adapters
from grpo_fsdp.models import build_policy, load_tokenizer
from grpo_fsdp.parallelize import is_sharded, shards
from grpo_fsdp.quant import full_weight, is_nf4
from grpo_fsdp.recipes.grpo import sync_weights
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.factory import engine_from_config, make_engine
from grpo_fsdp.rollout.hf import HFEngine, stop_token_ids
from grpo_fsdp.rollout.shared import SharedHFEngine

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 9, 14, 20, 7, 3, 40, 41], [8, 2, 2, 11, 60], [30, 31, 32]]
PROBES = PROMPTS[:2]
LORA = ["hardware.lora.enabled=true", "hardware.lora.rank=4", "hardware.lora.alpha=8", "hardware.lora.dropout=0.5"]
VARIANTS = {
    "plain": [],  # one fp32 process: plain parameters (parallelize.shards)
    "fsdp": ["hardware.cpu_offload=true", "hardware.activation_checkpointing=true"],  # FSDP2 on one process
    "nf4": ["hardware.load_in_4bit=true"],
    "fsdp-nf4": ["hardware.cpu_offload=true", "hardware.load_in_4bit=true"],  # the 8 GB profile's layout on one process:
}  # FSDP2 around everything but the NF4 weights (parallelize.nf4_left_out)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _snapshot(policy) -> dict:
    """name -> (the Parameter object, its class, DTensor placements, local storage pointer, values: one rank, so the
    local tensor is the whole one; an NF4 weight by its packed bytes and their dequantized values)."""
    out = {}
    for name, p in policy.named_parameters():
        local = _local(p)
        storage = local.quantized_data if is_nf4(local) else local
        out[name] = (p, type(p), getattr(p, "placements", None), storage.data_ptr(), full_weight(local).clone())
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shared_engine_samples_as_the_merged_copy_and_leaves_the_policy_as_it_was(variant):
    if "nf4" in variant:
        pytest.importorskip("torchao")
    cfg = compose([*SMALL, *LORA, *VARIANTS[variant]])
    d = distributed.init("cpu")
    try:
        tok = load_tokenizer(cfg.model)
        policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, 0, 64)
        assert is_sharded(policy) == variant.startswith("fsdp")
        with torch.no_grad():  # the adapters after some training: B != 0
            gen = torch.Generator().manual_seed(3)
            for _, m in lora_modules(policy):
                local = _local(m.lora_B.weight)  # one rank: the whole tensor
                local.copy_(torch.randn(local.shape, generator=gen) * 0.3)
        policy.train()
        before = _snapshot(policy)

        # the copy engine of before: its own weights, the merged ones (no forward of the policy runs here, so the
        # shared engine below is the first to run the FSDP2 modules: the root's lazy init is its business)
        copy = HFEngine(conf, stop_token_ids(tok, conf), tok.pad_token_id)
        copy.load_weights(merge_adapters(policy))
        shared = make_engine("hf", hf_conf=conf, tokenizer=tok, policy=policy, log=lambda _: None)
        assert isinstance(shared, SharedHFEngine)
        assert sum(p.numel() for p in shared.model.parameters()) == 0 and not shared.model.state_dict()  # owns none
        assert sum(p.numel() for p in copy.model.parameters()) > 0  # what the copy engine owns

        sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=16, seed=11)
        got, want = shared.generate(PROMPTS, sampling), copy.generate(PROMPTS, sampling)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
        base = HFEngine(conf, stop_token_ids(tok, conf), tok.pad_token_id)  # the adapters matter: the base model
        with adapters_disabled(policy):  # samples otherwise, so the comparison above can fail
            base.load_weights(merge_adapters(policy))
        assert [c.token_ids for c in base.generate(PROMPTS, sampling)] != [c.token_ids for c in want]

        # the policy as it was: every module's mode, the same Parameter objects, storage, sharding and values
        assert all(m.training for m in policy.modules())
        after = _snapshot(policy)
        assert after.keys() == before.keys()
        for name, (p, kind, placements, ptr, values) in before.items():
            q, kind2, placements2, ptr2, values2 = after[name]
            assert q is p and kind2 is kind and placements2 == placements and ptr2 == ptr, name
            assert torch.equal(values, values2), name
        if is_sharded(policy):
            managed = [p for p in policy.parameters() if not is_nf4(p)]  # FSDP2's; NF4 weights stay plain on one rank
            assert all(isinstance(p, DTensor) for p in managed)  # resharded
            with shared.held():  # gathered for the whole block (the evaluator's), nested calls do not re-gather
                assert not any(isinstance(p, DTensor) for p in policy.parameters())
                again = shared.generate(PROMPTS, sampling)
                assert not any(isinstance(p, DTensor) for p in policy.parameters())
            assert all(isinstance(p, DTensor) for p in policy.parameters() if not is_nf4(p))
            assert [c.token_ids for c in again] == [c.token_ids for c in got]

        # dropout is on again: two training forwards differ; the training step still runs (gradients on adapters)
        ids = torch.tensor([PROMPTS[0]])
        target = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool)
        torch.manual_seed(0)
        one, _ = policy(input_ids=ids, attention_mask=torch.ones_like(ids), target_mask=target)
        two, _ = policy(input_ids=ids, attention_mask=torch.ones_like(ids), target_mask=target)
        assert not torch.equal(one, two)
        (one.sum() + two.sum()).backward()
        assert all(m.lora_A.weight.grad is not None for _, m in lora_modules(policy))

        # nothing to sync: the first sync probes the shared modules (trivially close), later ones do nothing
        policy.zero_grad(set_to_none=True)
        gap = sync_weights(policy, shared, PROBES, 1e-4, d.device, first=True)
        assert gap is not None and gap < 1e-4
        assert sync_weights(policy, shared, PROBES, 1e-4, d.device) is None
        with pytest.raises(RuntimeError, match="no weights to load"):
            shared.load_weights(merge_adapters(policy))
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("offload", [False, True], ids=["one-fp32-process", "fsdp-offload"])
def test_a_full_fine_tune_shares_the_policy_unless_fsdp_wraps_it(tmp_path, offload):
    """Issue 13: one fp32 process's engine copy held the policy's very numbers. Unwrapped, the run's engine is the
    policy itself and samples what the copy engine samples; wrapped by FSDP2 (CPU offload), the copy engine stays."""
    cfg = compose([*SMALL, "algo=grpo", f"hardware.cpu_offload={str(offload).lower()}"])
    d = distributed.init("cpu")
    try:
        tok = load_tokenizer(cfg.model)
        policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, 0, 64)
        engine = engine_from_config(cfg, conf, tok, d.device, 0, str(tmp_path), policy=policy)
        assert is_sharded(policy) == offload and isinstance(engine, SharedHFEngine) != offload
        copy = HFEngine(conf, stop_token_ids(tok, conf), tok.pad_token_id)
        sync_weights(policy, copy, PROBES, 1e-4, d.device, first=True)
        if offload:
            return
        assert sum(p.numel() for p in engine.model.parameters()) == 0  # owns nothing
        sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=16, seed=5)
        got, want = engine.generate(PROMPTS, sampling), copy.generate(PROMPTS, sampling)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
        assert sync_weights(policy, engine, PROBES, 1e-4, d.device) is None  # nothing to send after the first sync
    finally:
        distributed.shutdown()


# ---------------------------------------------------------------- the memory plan: no engine copy under LoRA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_plan_knows_when_fsdp_wraps_the_policy(dtype, offload, world):
    cfg = compose(["hardware=cpu", f"hardware.param_dtype={dtype}", f"hardware.cpu_offload={str(offload).lower()}"])
    assert fsdp_wraps(cfg.hardware, world) == shards(cfg.hardware, world)


def test_plan_counts_the_gathered_policy_not_a_copy():
    """The hand-written arch of test_plan_estimate (P = 2824: 2 layers of 608 params, root 1608) with LoRA r 2 on
    q, k, v, o: per layer q 2*(8+8) = 32, k 2*(8+4) = 24, v 24, o 32 -> 112 adapter params, 224 in all."""
    lora = ["hardware.lora.enabled=true", "hardware.lora.rank=2", "rollout.engine=hf"]
    # h100x2 (bf16, c = 2; N = 2): the engine is the policy gathered whole, adapters included, plus the KV cache;
    # the copy engine of before held c*P = 5648 (merged: no adapters)
    est = estimate_memory(grpo(*lora), world_size=2)
    gathered = 2 * (LAYER * 2 + 112 * 2) + ROOT * 2
    assert gathered == 6096 and est.engine == gathered + KV == 7056 and est.kv_cache == KV
    sharded, optimizer = (2 * LAYER * 2 + ROOT * 2) / 2 + 4 * 224 / 2, 8 * 224 / 2
    assert est.generation == sharded + optimizer + gathered + KV == 3272 + 896 + 7056
    assert any("generates with the trainer's own modules, no copy of its own" in n for n in est.notes)

    # one fp32 CPU process: FSDP2 does not wrap the policy, nothing is gathered (for training either), the engine is
    # its KV cache alone (4 bytes: 2 x 2 layers x kv 4 x 4 x 6 rows x 10 positions = 3840), nothing kept while training
    def cpu(*extra):
        return estimate_memory(compose(["hardware=cpu", *PLAN_SMALL, "algo=grpo", "algo.prompts_per_step=2",
                                        "algo.group_size=3", "algo.max_new_tokens=6", *lora, *extra]), world_size=1)

    plain = cpu()
    assert plain.weights == 4 * P + 4 * 224 and plain.engine == plain.kv_cache == 3840
    # (4 micro-batches of 3 accumulate: gradients beside the step's work) and no engine weights kept while training
    assert plain.training == plain.weights + plain.optimizer + plain.gradients + plain.activations + plain.logits
    assert plain.generation == 4 * P + 4 * 224 + 8 * 224 + 3840
    # CPU offload keeps FSDP2 on one process: the engine gathers every block and the root in fp32 for the rollout
    wrapped = cpu("hardware.cpu_offload=true")
    assert wrapped.engine == 2 * (LAYER * 4 + 112 * 4) + ROOT * 4 + 3840
    # a sharded full fine-tune: the transformers engine still holds its own copy, c*P
    assert estimate_memory(grpo("rollout.engine=hf"), world_size=2).engine == 2 * P + KV
    # a full fine-tune FSDP2 does not wrap (one fp32 process) shares too: the engine is its KV cache, as under LoRA,
    # and nothing of it stays while training; with CPU offload FSDP2 wraps it, and the fp32 copy is back (4 P)
    full = estimate_memory(compose(["hardware=cpu", *PLAN_SMALL, "algo=grpo", "algo.prompts_per_step=2",
                                    "algo.group_size=3", "algo.max_new_tokens=6", "rollout.engine=hf"]), world_size=1)
    assert full.engine == full.kv_cache == 3840 and full.weights == 4 * P
    assert full.training == full.weights + full.optimizer + full.gradients + full.activations + full.logits + full.transient
    assert any("generates with the trainer's own modules" in n and "nothing to gather" in n for n in full.notes)
    offloaded = estimate_memory(compose(["hardware=cpu", *PLAN_SMALL, "algo=grpo", "algo.prompts_per_step=2",
                                         "algo.group_size=3", "algo.max_new_tokens=6", "rollout.engine=hf",
                                         "hardware.cpu_offload=true"]), world_size=1)
    assert offloaded.engine == 4 * P + 3840
