"""DPO with LoRA (issue 15 item 3, issue 14 item 1): the reference is the policy with its adapters off, for the
cached pass and the online reference alike, and no second copy of the weights is built.

In one process (the policy built as the trainer builds it: meta -> LoRA -> NF4 -> FSDP2): after DPO steps that
changed the adapters, the adapters-off reference (`lora.BaseModel`, online and through the cache pass) gives the
log-probs of a model without adapters that holds the same base weights, built on its own, to 1e-6; the first
step's loss is exactly ln 2. Through the trainer (QLoRA): the cached and the online reference give the same steps,
and the online run says that it scores with the adapters off instead of building a reference model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL, read_metrics, run_train
from safetensors.torch import load_file
from test_dpo_recipe import DPO, _close

from grpo_fsdp import distributed
from grpo_fsdp.algorithms.dpo import pair_losses, step_loss
from grpo_fsdp.cli import compose
from grpo_fsdp.data.preference import PreferenceSample
from grpo_fsdp.lora import BaseModel, lora_modules, trainable_parameters
from grpo_fsdp.models import build_policy, load_tokenizer
from grpo_fsdp.quant import full_weight
from grpo_fsdp.recipes.dpo_pairs import layout_pairs, pair_logps
from grpo_fsdp.recipes.dpo_reference import precompute
from grpo_fsdp.validation import validate

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = ["hardware.lora.enabled=true", "hardware.lora.rank=4", "hardware.lora.alpha=8"]


def _pairs() -> list[PreferenceSample]:
    gen = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, 60, (n,), generator=gen).tolist()
    return [PreferenceSample(ids(5 + i), ids(4 + i % 3), ids(6 - i % 2)) for i in range(6)]


def _no_adapter_model(lora_policy, cfg, tok, d):
    """A policy built without LoRA whose weights are the LoRA policy's base weights (NF4 ones dequantized): the
    reference computed independently of the adapter code."""
    plain_cfg = compose([*SMALL])
    plain, _ = build_policy(plain_cfg.model, plain_cfg.hardware, tok, d, cfg.train.seed, 64)
    base = {n: p for n, p in lora_policy.named_parameters() if ".lora_" not in n}
    with torch.no_grad():
        for name, p in plain.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(full_weight(base.pop(name)).to(local.dtype))
    assert not base  # every base weight found its place
    return plain.eval()


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_adapters_off_reference_is_the_base_model_after_dpo_steps(nf4, tmp_path):
    if nf4:
        pytest.importorskip("torchao")
    cfg = compose([*SMALL, *LORA, "algo=dpo", "data=preference_arithmetic", f"hardware.load_in_4bit={str(nf4).lower()}"])
    validate(cfg, world_size=1, cuda_available=False)  # DPO with LoRA (and a 4-bit base) is a configuration the trainer runs
    d = distributed.init("cpu")
    try:
        tok = load_tokenizer(cfg.model)
        policy, _ = build_policy(cfg.model, cfg.hardware, tok, d, cfg.train.seed, 64)
        samples = _pairs()
        batch = layout_pairs(samples, tok.pad_token_id)
        reference = BaseModel(policy)
        optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=1e-2, weight_decay=0.0)
        losses = []
        for _ in range(3):  # DPO steps with the online reference: the adapters move, the reference must not
            pol = pair_logps(policy, batch, d.device)
            with torch.no_grad():
                ref = pair_logps(reference, batch, d.device)
            per_pair, _, _ = pair_losses("sigmoid", pol.chosen, pol.rejected, ref.chosen, ref.rejected, pol.chosen_len,
                                         pol.rejected_len, 0.5, 0.0)
            loss = step_loss(per_pair, float(len(samples)), -pol.chosen.sum(), 1.0, 0.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(math.log(2), abs=1e-7)  # B = 0: policy = reference exactly at step 0
        assert losses[-1] < losses[0] - 1e-3
        assert all(float(distributed.full_tensor(m.lora_B.weight).detach().abs().max()) > 0 for _, m in lora_modules(policy))

        plain = _no_adapter_model(policy, cfg, tok, d)
        with torch.no_grad():
            expected = pair_logps(plain, batch, d.device)
            online = pair_logps(reference, batch, d.device)
            tuned = pair_logps(policy, batch, d.device)
        cached = precompute(reference, samples, tmp_path / "cache", 4, 2, tok.pad_token_id, d, say=lambda *_: None)
        want = torch.stack([expected.chosen, expected.rejected], dim=1)
        torch.testing.assert_close(torch.stack([online.chosen, online.rejected], dim=1), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cached, want, rtol=1e-6, atol=1e-6)  # the cache pass: adapters off too
        assert float((tuned.chosen - expected.chosen).abs().max()) > 1e-2  # the adapters did change the policy
        assert policy.training  # the cache pass put the policy back in training mode
    finally:
        distributed.shutdown()


def test_qlora_dpo_cached_reference_equals_adapters_off_online_reference(tmp_path):
    """QLoRA DPO through the trainer: with the cache (scored once, adapters off) and online (adapters off at every
    step, after the adapters moved) the steps agree to 1e-5; the first loss is ln 2; no reference model is built."""
    pytest.importorskip("torchao")
    common = [*DPO, *LORA, "hardware.load_in_4bit=true", "optim.lr=1e-2", "algo.eval_pairs=8"]  # + held-out pairs
    cached = run_train([*common, f"run_dir={tmp_path / 'cached'}", "checkpoint.export_hf=true"])
    online = run_train([*common, f"run_dir={tmp_path / 'online'}", "algo.precompute_ref=false"])
    line = "reference: the policy with its LoRA adapters off (the base model; no second copy of the weights)\n"
    assert line in cached.stdout and line in online.stdout
    # the end of a LoRA run writes the adapter (PEFT) beside the merged model, as GRPO's does: the trained B != 0
    adapter = tmp_path / "cached" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    b_mats = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert b_mats and all(float(v.abs().max()) > 0 for v in b_mats.values())
    assert (tmp_path / "cached" / "hf" / "model.safetensors").is_file()
    assert not (tmp_path / "online" / "ref_logps").exists()
    a, b = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "online")
    assert a[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and b[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(a[-1]["train/rewards_margin"]) > 1e-3  # the adapters moved away from the reference
    for x, y in zip(a, b, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/logps_chosen", "train/logps_rejected"):
            assert _close(x[key], y[key]), (key, x[key], y[key])
        for key in ("train/rewards_chosen", "train/rewards_rejected"):  # beta x fp32 sums of ~-300: absolute
            assert abs(x[key] - y[key]) <= 1e-4, (key, x[key], y[key])
    assert a[-1]["eval/reward_accuracy"] == b[-1]["eval/reward_accuracy"]  # held-out reference: adapters off, both ways
    assert abs(a[-1]["eval/rewards_margin"] - b[-1]["eval/rewards_margin"]) <= 1e-4
