"""Batch plan and memory estimate: values checked against arithmetic written out here."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from grpo_fsdp.cli import compose, group_options
from grpo_fsdp.config import ArchConfig
from grpo_fsdp.estimate import CUDA_CONTEXT_BYTES, GIB, HOST_RUNTIME_BYTES, NF4_BYTES, estimate_memory
from grpo_fsdp.estimate_table import format_table
from grpo_fsdp.param_count import TINY_VOCAB_FALLBACK, lora_param_count, param_count
from grpo_fsdp.plan import BatchPlan


def test_param_count_qwen25_1_5b_tied():
    arch = ArchConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                      num_heads=12, num_kv_heads=2, tie_embeddings=True)  # fmt: skip
    assert param_count(arch) == 1_543_714_304


def test_param_count_qwen25_7b_untied():
    arch = ArchConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                      num_heads=28, num_kv_heads=4, tie_embeddings=False)  # fmt: skip
    assert param_count(arch) == 7_615_616_512


def test_param_count_without_attention_bias_drops_qkv_biases():
    arch = ArchConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    # kv_dim = 8/2*1 = 4; biases per layer: q 8 + k 4 + v 4 = 16
    assert param_count(arch) - param_count(arch, attention_bias=False) == 2 * 16


def test_tiny_vocab_fallback_matches_tokenizer():
    from grpo_fsdp.tokenizer import build_tiny_tokenizer

    assert TINY_VOCAB_FALLBACK == len(build_tiny_tokenizer())
    cfg = compose(["model=tiny"])
    assert estimate_memory(cfg, 1).params == estimate_memory(cfg, 1, vocab_size=TINY_VOCAB_FALLBACK).params


def test_plan_grad_accum_and_sft_semantics():
    cfg = compose(["train.global_batch_size=32", "train.micro_batch_size=4"])
    plan = BatchPlan.from_config(cfg, world_size=2)
    assert plan.grad_accum_steps == 32 // (4 * 2) == 4
    assert plan.prompts_per_step == plan.sequences_per_step == 32
    assert plan.optimizer_steps_per_batch == 1 and plan.world_size == 2 and plan.micro_batch_size == 4
    assert plan.loss_denominator == "target tokens in the step, all-reduced over ranks"
    table = plan.format_table()
    assert table.splitlines()[0] == "batch semantics"
    # aligned: every value starts two spaces after the widest label
    width = max(len(k) for k, _ in plan.rows())
    for line, (key, value) in zip(table.splitlines()[2:], plan.rows(), strict=True):
        assert line == key.ljust(width) + "  " + value
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.world_size = 3  # type: ignore[misc]


# A small arch where every number can be written out by hand:
# V=100, h=8, i=16, 2 layers, 2 heads, 1 kv head -> kv_dim = 4.
# per layer: q 8*8+8=72, k 8*4+4=36, v 36, o 64, mlp 3*8*16=384, norms 16 -> 608
#   of which linear weights 64+32+32+64+384 = 576, other (biases + norms) 16+16 = 32
# root: embed 800 + final norm 8 + lm_head 800 (untied) = 1608; total P = 1608 + 2*608 = 2824
SMALL = [
    "model.arch.vocab_size=100", "model.arch.hidden_size=8", "model.arch.intermediate_size=16",
    "model.arch.num_layers=2", "model.arch.num_heads=2", "model.arch.num_kv_heads=1",
    "model.arch.tie_embeddings=false", "data.max_prompt_length=4", "data.max_length=10",
    "train.micro_batch_size=3", "train.global_batch_size=12", "train.logprob_chunk_size=16",
]  # fmt: skip
P, LAYER, ROOT, TOKENS = 2824, 608, 1608, 3 * 10
# Activations (estimate.activation_bytes), h = 8, kv = 4, i = 16, T tokens, c bytes:
#   one block saves T * (c * (6h + 2kv + 4i) + 8h) = T * (120c + 64); its gradient temporaries T * c * (3i + 2h) = T * 64c;
#   the head side (final norm, the head's input) T * (4h + 2ch) = T * (32 + 16c)
#   with checkpointing: layers * T * h * c + one block; without: every block
# bf16, T = 30: block 30 * 304 = 9120, grads 30 * 128 = 3840, head 30 * 64 = 1920
ACT_AC_BF16 = 2 * TOKENS * 8 * 2 + 9120 + 3840 + 1920  # 15840
ACT_NOAC_BF16 = 2 * 9120 + 3840 + 1920  # 24000
LOGITS_SFT = 30 * 100 * 4  # V = 100 <= 4,096 is one block of all 30 scored tokens, whatever the chunk; fp32, no entropy
HEAD_GRAD = 100 * 8 * 2  # the LM head's unsharded bf16 gradient (full fine-tune): V x h x c


def small(*extra: str):
    return compose(["hardware=h100x2", *SMALL, *extra])  # bf16 compute (2 bytes), 2 ranks


def test_small_param_count():
    assert param_count(small().model.arch) == P


def test_small_estimate_full_shard_with_checkpointing():
    est = estimate_memory(small("hardware.activation_checkpointing=true"), world_size=2)
    # fp32 master shard 4P/2 + gathered bf16: two blocks + root params
    assert est.weights == 4 * P // 2 + 2 * (2 * LAYER + ROOT)
    assert est.gradients == 4 * P // 2
    assert est.optimizer == 8 * P // 2
    assert est.activations == ACT_AC_BF16 == 15840
    assert est.logits == LOGITS_SFT and est.transient == HEAD_GRAD
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations + LOGITS_SFT + HEAD_GRAD + CUDA_CONTEXT_BYTES
    assert est.cpu_bytes == 0 and est.trainable_params == P


def test_small_estimate_without_checkpointing():
    est = estimate_memory(small("hardware.activation_checkpointing=false"), world_size=2)
    assert est.activations == ACT_NOAC_BF16 == 24000 and est.logits == LOGITS_SFT


def test_fp32_compute_scales_activations_and_gathered_copy():
    est = estimate_memory(small("hardware.param_dtype=float32", "hardware.activation_checkpointing=false"), 2)
    assert est.weights == 4 * P // 2 + 4 * (2 * LAYER + ROOT)
    # fp32, T = 30: every block 30 * (480 + 64) = 16320, grads 30 * 256 = 7680, head 30 * (32 + 64) = 2880
    assert est.activations == 2 * 16320 + 7680 + 2880 == 43200 and est.logits == LOGITS_SFT


def test_cpu_offload_moves_sharded_state_to_cpu():
    on_gpu = estimate_memory(small(), world_size=2)
    off = estimate_memory(small("hardware.cpu_offload=true"), world_size=2)
    assert off.gradients == 0 and off.optimizer == 0
    assert off.weights == 2 * (2 * LAYER + ROOT)  # only the gathered bf16 copies stay
    assert off.cpu_bytes == 4 * P // 2 + 4 * P // 2 + 8 * P // 2
    assert off.total < on_gpu.total
    assert off.cpu_bytes + off.total == on_gpu.total


def test_zero2_like_holds_more_weights_than_full_shard():
    zero2 = estimate_memory(small("hardware.reshard_after_forward=false"), world_size=2)
    assert zero2.weights == 4 * P // 2 + 2 * P  # whole bf16 model stays gathered
    # with 4 layers full shard gathers only 2 of them; ZeRO-2-like keeps all 4
    p4 = ROOT + 4 * LAYER
    full = estimate_memory(small("model.arch.num_layers=4", "hardware.reshard_after_forward=true"), 2)
    zero2 = estimate_memory(small("model.arch.num_layers=4", "hardware.reshard_after_forward=false"), 2)
    assert full.weights == 4 * p4 // 2 + 2 * (2 * LAYER + ROOT)
    assert zero2.weights - full.weights == 2 * 2 * LAYER


def test_lora_4bit_estimate():
    cfg = small("hardware.lora.enabled=true", "hardware.lora.rank=2", "hardware.load_in_4bit=true",
                "hardware.cpu_offload=false", "hardware.lora.target_modules=[q_proj,down_proj,not_a_module]")  # fmt: skip
    # q_proj: 2*(8+8)=32, down_proj: 2*(16+8)=48 -> 80 per layer, 160 in all
    assert lora_param_count(cfg.model.arch, 2, ["q_proj", "down_proj"]) == (160, [])
    est = estimate_memory(cfg, world_size=2)
    # NF4 holds the targets' weights, q_proj 8*8 + down_proj 16*8 = 192 of the 576 linear weights (4 bits + an int8
    # scale per 64 values + an fp32 factor per 256 scales); the other 384 and the biases/norms (32) stay bf16
    assert NF4_BYTES == 0.5 + 1 / 64 + 4 / (64 * 256)
    base_layer = 192 * NF4_BYTES + (384 + 32) * 2
    sharded = (2 * base_layer + ROOT * 2) / 2 + 4 * 160 / 2
    gathered = 2 * (base_layer + 80 * 2) + ROOT * 2
    assert est.weights == round(sharded + gathered)
    assert est.base_weights == round((2 * base_layer + ROOT * 2) / 2 + 2 * base_layer + ROOT * 2)
    assert est.adapters == round(4 * 160 / 2 + 2 * 80 * 2)
    assert est.transient == 16 * 8 * 2  # the largest NF4 weight (down_proj) dequantized to bf16, no head gradient
    # one rank: FSDP leaves the NF4 weights alone (parallelize.nf4_left_out), all of them on the device, even offloaded
    one = estimate_memory(_with(cfg, "hardware.cpu_offload", True), world_size=1)
    assert one.weights == round(2 * ((384 + 32) * 2 + 80 * 2) + ROOT * 2 + 2 * 192 * NF4_BYTES)
    assert est.gradients == 4 * 160 // 2 and est.optimizer == 8 * 160 // 2
    assert est.trainable_params == 160
    assert any("not_a_module" in n for n in est.notes)


def _with(cfg, dotted: str, value):
    out = copy.deepcopy(cfg)
    *path, leaf = dotted.split(".")
    node = out
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)
    return out


def test_format_table_fit_lines():
    est = estimate_memory(small(), world_size=2)
    assert "fits: yes" in format_table(est, 80)
    tiny_gpu = est.total / GIB / 2
    assert "fits: NO" in format_table(est, tiny_gpu)
    assert "fits" not in format_table(est, 0)


@pytest.mark.parametrize("hardware", group_options("hardware"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_profile_and_model_composes_and_formats(hardware, model):
    cfg = compose([f"hardware={hardware}", f"model={model}"])
    world = cfg.hardware.nproc_per_node
    est = estimate_memory(cfg, world)
    assert est.total > 0 and est.params > 0
    table = format_table(est, cfg.hardware.gpu_memory_gib)
    assert "total per device" in table
    assert "batch semantics" in BatchPlan.from_config(cfg, world).format_table()


# ---------------------------------------------------------------- GRPO: reference model and rollout engine
# (issue 11, item 16; issue 14) SMALL on h100x2 (bf16, c = 2 bytes, N = 2 ranks, activation checkpointing on), with
# 2 prompts x G = 3, 6 new tokens: a micro-batch of 3 completions is 1 prompt of 4 tokens + 3 x 6 = 22 tokens, 18 scored.
#   weights     4P/2 + 2 * (2 * LAYER + ROOT) = 5648 + 5648 = 11296
#   gradients   4P/2 = 5648; optimizer 8P/2 = 11296
#   activations T = 22: 2*22*8*2 + 22*304 + 22*128 + 22*64 = 704 + 6688 + 2816 + 1408 = 11616
#   logits      18 scored x V 100 (one block: V <= 4,096) x 4 bytes x 2 (GRPO's training forward asks for the entropy) = 14400
#   reference   bf16 shard c*P/N = 2*2824/2 = 2824 (before: not counted; built as a second fp32 policy, 4P/2 = 5648
#               of weights plus its gathered copies)
#   engine      the transformers engine's unsharded bf16 copy, c*P = 5648, and its KV cache: 2 (k, v) x 2 layers x kv 4
#               x 2 bytes x (2 prompts / 2 ranks x G 3) rows x (4 + 6) positions = 960
WEIGHTS, GRADS, OPTIM, ACTS, LOGITS, KV = 4 * P // 2 + 2 * (2 * LAYER + ROOT), 4 * P // 2, 8 * P // 2, 11616, 14400, 960


def grpo(*extra: str):
    return small("algo=grpo", "algo.prompts_per_step=2", "algo.group_size=3", "algo.max_new_tokens=6", *extra)


def test_grpo_reference_in_bf16_and_the_transformers_engine_copy():
    est = estimate_memory(grpo("algo.beta=0.04", "rollout.engine=hf"), world_size=2)
    assert (est.weights, est.gradients, est.optimizer, est.activations) == (WEIGHTS, GRADS, OPTIM, ACTS) == (11296, 5648, 11296, 11616)
    assert (est.logits, est.transient, est.kv_cache) == (LOGITS, HEAD_GRAD, KV)
    assert est.reference == 2 * P // 2 == 2824
    assert est.engine == 2 * P + KV == 6608
    # training: the engine sleeps in host memory (cuda, rollout.sleep_level=1)
    assert est.training == 11296 + 5648 + 11296 + 11616 + 14400 + 1600 + 2824 == 58680
    # generation: fp32 master shard 4P/2 + optimizer 8P/2 + reference + engine; gradients and activations are gone
    assert est.generation == 5648 + 11296 + 2824 + 6608 == 26376
    assert est.total == max(58680, 26376) + CUDA_CONTEXT_BYTES
    table = format_table(est, 80)
    labels = [line.split("  ")[0].strip() for line in table.splitlines()[2:]]
    assert labels[:14] == ["parameters", "world size", "weights", "gradients", "optimizer", "activations",
                           "log-prob chunk (fp32 logits)", "transient (head grad / NF4 dequant)", "reference model",
                           "rollout engine", "training phase", "generation phase", "CUDA context", "total per device"]
    assert any(n.startswith("reference model (algo.beta=0.04): bfloat16, frozen, sharded") for n in est.notes)
    assert any(n.startswith("rollout engine: the transformers engine holds its own unsharded bfloat16 copy") for n in est.notes)


def test_a_reference_copy_only_where_one_is_built():
    """models.build_reference runs for GRPO with beta > 0 and DPO with precompute_ref=false, never under LoRA (the
    reference is the adapters-off policy) nor for DPO's cached log-probs: the plan counts c*P/N exactly there."""
    assert estimate_memory(grpo("algo.beta=0.04", "rollout.engine=hf", "hardware.lora.enabled=true"), 2).reference == 0
    dpo = ("algo=dpo", "data=preference_arithmetic")
    assert estimate_memory(small(*dpo), 2).reference == 0  # cached reference log-probs (the default)
    online = estimate_memory(small(*dpo, "algo.precompute_ref=false"), 2)
    assert online.reference == 2 * P // 2 == 2824
    assert any(n.startswith("reference model (algo.precompute_ref=false): bfloat16") for n in online.notes)
    assert estimate_memory(small(*dpo, "algo.precompute_ref=false", "hardware.lora.enabled=true"), 2).reference == 0


def test_grpo_without_kl_has_no_reference_and_sft_has_neither():
    est = estimate_memory(grpo("algo.beta=0", "rollout.engine=hf"), world_size=2)
    assert est.reference == 0 and est.engine == 6608
    assert est.training == 58680 - 2824 and est.generation == 5648 + 11296 + 6608
    sft = estimate_memory(small(), world_size=2)
    assert (sft.reference, sft.engine, sft.generation, sft.kv_cache) == (0, 0, 0, 0)
    assert sft.total - CUDA_CONTEXT_BYTES == sft.training == WEIGHTS + GRADS + OPTIM + ACT_AC_BF16 + LOGITS_SFT + HEAD_GRAD
    assert "rollout engine" not in format_table(sft, 80)


def test_grpo_vllm_share_can_be_the_peak():
    # vLLM reserves 0.3 x 80 GiB = 24 GiB (weights + KV cache) while generating: the generation phase is the peak
    est = estimate_memory(grpo("algo.beta=0.04", "rollout.engine=vllm"), world_size=2)
    share = round(0.3 * 80 * GIB)
    assert est.engine == share == 25_769_803_776
    assert est.generation == 5648 + 11296 + 2824 + share
    assert est.total - CUDA_CONTEXT_BYTES == est.generation > est.training == 58680
    # rollout.engine=auto (the default) resolves at start-up: the larger of vLLM's share and the transformers copy
    auto = estimate_memory(grpo("algo.beta=0.04"), world_size=2)
    assert auto.engine == max(share, 2 * P + KV) == share and auto.total == est.total
    assert any(n.startswith("rollout engine (auto, the larger is counted): vLLM reserves") for n in auto.notes)


def test_grpo_reference_goes_to_the_host_with_cpu_offload():
    est = estimate_memory(grpo("algo.beta=0.04", "rollout.engine=hf", "hardware.cpu_offload=true"), world_size=2)
    assert est.reference == 0 and est.cpu_bytes == 4 * P // 2 + 4 * P // 2 + 8 * P // 2 + 2 * P // 2
    assert est.generation == 0 + 0 + 6608  # nothing of the trainer stays resident on the device
    assert est.training == 2 * (2 * LAYER + ROOT) + ACTS + LOGITS + HEAD_GRAD


def test_cpu_engine_stays_in_memory_while_training_unless_level_2():
    # hardware=cpu: fp32 (c = 4), no checkpointing; HFEngine.sleep(1) does nothing on a CPU device, and the KV cache
    # (4 bytes: 2 x 2 layers x kv 4 x 4 x rows x 10 positions) lives only during generate
    def cpu(world, *extra):
        return estimate_memory(compose(["hardware=cpu", *SMALL, "algo=grpo", "algo.prompts_per_step=2", "algo.group_size=3",
                                        "algo.max_new_tokens=6", "rollout.engine=hf", *extra]), world_size=world)

    def plain(e):
        return e.weights + e.gradients + e.optimizer + e.activations + e.logits + e.transient

    # two ranks: FSDP2 shards the policy and the engine holds its own fp32 copy (4 P) beside a KV cache of 3 rows
    awake, level2 = cpu(2), cpu(2, "rollout.sleep_level=2")
    assert awake.engine == level2.engine == 4 * P + 1920 and awake.kv_cache == 1920
    assert awake.training == plain(awake) + 4 * P and level2.training == plain(level2)
    assert awake.generation == level2.generation == 4 * P // 2 + 8 * P // 2 + 4 * P + 1920  # shard + optimizer + engine
    # one process: FSDP2 does not wrap the policy and the engine generates with it (rollout/shared.py): no copy, so
    # nothing to keep while training at either level; the engine is its KV cache of 6 rows
    one, one2 = cpu(1), cpu(1, "rollout.sleep_level=2")
    assert one.engine == one.kv_cache == 3840 and one.training == plain(one) == one2.training
    assert one.generation == 4 * P + 8 * P + 3840  # master + optimizer + KV cache
    # loading: rank 0's full fp32 model beside the fp32 shards it fills; no CUDA context on a CPU device, the
    # process's own runtime instead
    assert one.loading == 4 * P + 4 * P and one.cuda_context == 0 and one.host_runtime == HOST_RUNTIME_BYTES
    assert one.total == max(one.training, one.generation, one.loading) + HOST_RUNTIME_BYTES
