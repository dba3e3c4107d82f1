"""Issue 14 item 7: the memory plan (grpo_fsdp/estimate.py) of the 8 GB preset, its pieces against hand arithmetic
and a brute-force count, its refusal of a plan over hardware.gpu_memory_gib, and the plan against a measured step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED

from grpo_fsdp.cli import compose
from grpo_fsdp.config import ConfigError
from grpo_fsdp.estimate import (
    GIB,
    activation_bytes,
    block_saved_bytes,
    estimate_memory,
    kv_cache_bytes,
    logits_bytes,
    micro_batch_tokens,
)
from grpo_fsdp.estimate_table import format_table
from grpo_fsdp.memory_fit import check_fits, fitting_overrides
from grpo_fsdp.validation import validate

PRESET = "experiment=deepseek-r1-distill-1.5b-gpu8gb"


def test_preset_keeps_the_seed_recipe():
    cfg = compose([PRESET])
    hw, g, t = cfg.hardware, cfg.algo, cfg.train
    assert (hw.name, hw.load_in_4bit, hw.lora.enabled, hw.lora.rank, hw.lora.alpha) == ("gpu8gb", True, True, 16, 32)
    assert list(hw.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"] and hw.activation_checkpointing
    assert (g.group_size, cfg.data.max_prompt_length, g.max_new_tokens, g.beta, g.clip_eps_low, g.clip_eps_high) == (
        8, 512, 512, 0.0, 0.2, 0.2)
    # batch 1 (one prompt's G completions per micro-batch) with accumulation 4; lr 1e-4
    assert (t.micro_batch_size, t.global_batch_size // t.micro_batch_size, cfg.optim.lr) == (8, 4, 1e-4)
    assert cfg.model.name == "deepseek-r1-distill-qwen-1.5b"
    validate(compose([PRESET, "dry_run=true"]), 1, cuda_available=False)  # every check, the memory plan's included


def test_preset_dry_run_prints_the_plan_line_by_line_and_meets_the_goal():
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.train", PRESET, "dry_run=true"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout.split("memory plan (per device)")[1]
    labels = [line.split("  ")[0] for line in plan.strip().splitlines()[1:] if "  " in line]
    for label in ("base weights (4-bit NF4)", "adapters (fp32 + gathered)", "optimizer",
                  "activations (8 seq, 4608 tokens, with checkpointing)", "log-prob chunk (fp32 logits)", "rollout engine",
                  "CUDA context", "total per device"):
        assert label in labels, (label, labels)
    assert "KV cache" in plan and "fits: yes" in plan
    est = estimate_memory(compose([PRESET]), 1)
    assert est.total <= 4.5e9  # the goal, 4.5 GB (Unsloth: 5 GB; the seed's own budget 6.5 GB)


def test_micro_batch_tokens_by_layout():
    # the preset: one prompt of 512 + 8 completions of 512 through the network (shared prefix), 8 x 512 scored
    assert micro_batch_tokens(compose([PRESET])) == (512 + 8 * 512, 8 * 512) == (4608, 4096)
    # 16 completions of G = 8 span 2 prompts; padded rows repeat the prompt in each
    assert micro_batch_tokens(compose([PRESET, "train.micro_batch_size=16"])) == (2 * 512 + 16 * 512, 16 * 512)
    assert micro_batch_tokens(compose([PRESET, "algo.shared_prefix=false"])) == (8 * 1024, 8 * 512)
    assert micro_batch_tokens(compose(["train.micro_batch_size=4", "data.max_length=100"])) == (400, 400)  # SFT rows


def test_logits_and_kv_cache_by_hand():
    # chunk 256 of 4096 scored tokens x V 151,936 x 4 bytes, twice with the entropy
    assert logits_bytes(151_936, 256, 4096, entropy=True) == 256 * 151_936 * 4 * 2 == 311_164_928
    assert logits_bytes(100, 1024, 30, entropy=False) == 30 * 100 * 4  # fewer tokens than the chunk: all of them
    # a vocabulary of at most 4,096 tokens is one block, whatever the chunk (logprobs._block_columns)
    assert logits_bytes(4096, 256, 1000, entropy=False) == 1000 * 4096 * 4
    assert logits_bytes(4097, 256, 1000, entropy=False) == 256 * 4097 * 4


def test_the_plans_one_block_vocabulary_is_the_head_s():
    from grpo_fsdp import logprobs
    from grpo_fsdp.estimate import ONE_BLOCK_VOCAB

    assert ONE_BLOCK_VOCAB == logprobs._ONE_BLOCK_VOCAB
    # k and v x 28 layers x (2 KV heads x 128) x bf16 x 8 sequences (rollout.max_batch_size) x (512 + 512) positions
    assert kv_cache_bytes(compose([PRESET]), 1) == 2 * 28 * 256 * 2 * 8 * 1024 == 234_881_024
    assert kv_cache_bytes(compose([PRESET, "rollout.max_batch_size=0"]), 1) == 4 * 234_881_024  # 4 prompts x G at once


def test_chunked_head_block_holds_what_the_plan_counts():
    from grpo_fsdp.logprobs import _block_columns

    V, chunk = 151_936, 256
    for n in (1, 100, 256, 4096, 30_000):  # one [N, c] fp32 block: never more logits than min(chunk, N) x V
        c = _block_columns(n, V, chunk)
        assert n * c <= min(chunk, n) * V and n * c >= 0.99 * min(chunk, n) * V


@pytest.mark.parametrize("dtype,exact", [(torch.float32, True), (torch.bfloat16, False)])
def test_block_activations_match_the_tensors_autograd_saves(dtype, exact):
    """Brute force: every tensor one Qwen2 decoder block saves for backward (saved_tensors_hooks), by storage."""
    from transformers import AutoModelForCausalLM

    from grpo_fsdp.models import hf_config, load_tokenizer

    cfg = compose(["model.arch.hidden_size=128", "model.arch.intermediate_size=352", "model.arch.num_heads=4",
                   "model.arch.num_kv_heads=2", "model.arch.num_layers=1"])
    conf = hf_config(cfg.model, load_tokenizer(cfg.model), "sdpa")
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    layer, T = model.model.layers[0], 96
    x = torch.randn(1, T, 128, dtype=dtype, requires_grad=True)
    pe = model.model.rotary_emb(x, torch.arange(T)[None])
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {t.untyped_storage().data_ptr() for t in pe}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=pe, attention_mask=None)
    measured = sum(seen.values())
    # per token: rsqrt of two norms (2 x 4 bytes) and SDPA's log-sum-exp per head (4 x 4 bytes) are not counted
    planned = block_saved_bytes(cfg.model.arch, dtype.itemsize, T)
    if exact:
        assert measured == planned + T * (8 + 4 * 4)
    else:  # bf16: one h-wide tensor less than the formula's 6 (it counts the fp32 case's), within 3%
        assert planned >= measured - T * 24 and planned <= 1.03 * measured


def test_checkpointing_keeps_block_inputs_and_one_block():
    arch = compose([PRESET]).model.arch
    h, i, T, c, L = 1536, 8960, 4608, 2, 28
    block = T * (c * (6 * h + 2 * 256 + 4 * i) + 8 * h)
    grads, head = T * c * (3 * i + 2 * h), T * (4 * h + 2 * c * h)
    assert activation_bytes(arch, c, T, checkpointing=True) == L * T * h * c + block + grads + head
    assert activation_bytes(arch, c, T, checkpointing=False) == L * block + grads + head


def test_gpu8gb_with_64_completions_of_4k_is_refused_in_one_line():
    over = [PRESET, "algo.group_size=64", "algo.max_new_tokens=4096", "data.max_length=4608"]
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.train", *over, "dry_run=true"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: hardware.gpu_memory_gib: the memory plan needs ") and "over 8 GiB (largest: " in line
    assert line.split("(largest: ")[1].startswith("activations ")  # 8 completions of 4k per micro-batch
    # the override it names fits: apply it and the plan passes
    fix = line.split("; try ")[1].split(" (plan ")[0].split()
    assert fix and all("=" in f for f in fix)
    cfg = compose([*over, *fix])
    check_fits(cfg, 1)
    assert estimate_memory(cfg, 1).total <= 8 * GIB


def test_plain_gpu8gb_profile_with_64_completions_of_4k_is_refused():
    cfg = compose(["hardware=gpu8gb", "algo=grpo", "model=deepseek-r1-distill-qwen-1.5b", "algo.group_size=64",
                   "algo.max_new_tokens=4096", "train.global_batch_size=64"])
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, 1)
    assert err.value.field_name == "hardware.gpu_memory_gib" and "\n" not in str(err.value)
    assert "(largest: KV cache " in str(err.value) and "try rollout.max_batch_size=" in str(err.value)  # 16 x 64 decoded at once


def test_fitting_overrides_greedy_and_none_when_nothing_fits():
    cfg = compose([PRESET, "algo.group_size=64", "algo.max_new_tokens=4096"])
    over, total = fitting_overrides(cfg, 1, 8 * GIB)
    assert total <= 8 * GIB and total == estimate_memory(compose([PRESET, "algo.group_size=64", "algo.max_new_tokens=4096",
                                                                  *over]), 1).total
    assert fitting_overrides(cfg, 1, 0.1 * GIB) is None  # the NF4 base alone is more
    assert fitting_overrides(compose([PRESET]), 1, 8 * GIB) == ([], estimate_memory(compose([PRESET]), 1).total)


def test_cpu_plan_shows_the_host_runtime_not_a_cuda_context():
    est = estimate_memory(compose(["algo=grpo"]), 1)
    table = format_table(est, 0, compose(["algo=grpo"]))
    assert "host runtime (data, threads)" in table and "CUDA context" not in table


# ------------------------------------------------------------------ the plan against a measured step (CPU)
TINY_WIDE = ["model.arch.hidden_size=512", "model.arch.intermediate_size=2048", "model.arch.num_layers=4",
             "model.arch.num_heads=8", "model.arch.num_kv_heads=4"]  # 16 M params: tensors dwarf the process's own memory


def measure(tmp_path, variants: str) -> list[dict]:
    """benchmarks/qlora_memory.py on the CPU: one GRPO step per variant, each in its own process."""
    proc = subprocess.run([sys.executable, "benchmarks/qlora_memory.py", "--model", "tiny", "--device", "cpu", "--variants",
                           variants, "--group-size", "8", "--prompt-len", "64", "--max-new-tokens", "32", "--out", str(tmp_path),
                           "--", *TINY_WIDE], cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (doc,) = tmp_path.glob("qlora_memory-*.json")
    return json.loads(doc.read_text())["runs"][-1]["variants"]


def _within(r: dict, tol: float) -> None:
    plan, measured = r["plan"]["compare_bytes"], r["measured_bytes"]
    assert abs(plan - measured) <= tol * measured, (r["variant"], plan / 2**20, measured / 2**20)


def test_qlora_plan_within_20_percent_of_measured_peak_rss(tmp_path):
    (r,) = measure(tmp_path, "qlora")
    assert r["measure"] == "VmHWM - VmRSS after imports" and r["exit_code"] == 0
    _within(r, 0.20)


@pytest.mark.slow
def test_full_and_lora_plans_within_20_percent_of_measured_peak_rss(tmp_path):
    for r in measure(tmp_path, "full,lora"):
        _within(r, 0.20)


def test_shared_tokenizer_is_where_the_benchmark_looks():
    if not (SHARED / "tokenizers" / "qwen2.5").is_dir():
        pytest.skip("../shared/tokenizers/qwen2.5 is absent")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import qlora_memory

    a = qlora_memory.parse_args(["--model", "qwen2.5-1.5b", "--device", "cpu"])
    assert a.tokenizer.endswith("tokenizers/qwen2.5")
    over = qlora_memory.overrides(a, "qlora", "/tmp/x")
    cfg = compose(over)
    assert cfg.hardware.load_in_4bit and cfg.hardware.lora.enabled and cfg.model.arch.hidden_size == 1536
    assert (cfg.algo.group_size, cfg.train.micro_batch_size, cfg.train.max_steps) == (8, 8, 1)


def test_no_refusal_without_a_device_size_or_on_the_cpu():
    big = [PRESET, "algo.group_size=64", "algo.max_new_tokens=4096"]
    check_fits(compose([*big, "hardware.gpu_memory_gib=0"]), 1)  # no size: nothing to compare with
    check_fits(compose([*big, "hardware=cpu"]), 1)  # a CPU device: host memory is the machine's business
    with pytest.raises(ConfigError):
        check_fits(compose(big), 1)
