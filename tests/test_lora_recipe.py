"""LoRA and QLoRA through the trainer (tiny model, CPU, gloo): a GRPO step does not depend on the world size
(1 vs 2 processes, NF4 base, KL to the adapters-off base), kill-and-resume is bit-identical to a straight run
(fp32 and NF4 base), and the run's exports load where users load them: the PEFT adapter with `peft`, the merged
model with `AutoModelForCausalLM`, with the same logits; the offline export of its checkpoint agrees."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL, TOY, _env, read_metrics, run_train
from test_grpo_recipe import _close
from test_resume import _numbers, _step

pytest.importorskip("torchao")

LORA = ["hardware.lora.enabled=true", "hardware.lora.rank=4", "hardware.lora.alpha=8"]
GRPO = [*SMALL, *TOY, "algo=grpo", "algo.reward_workers=1", "algo.reward_format=1.0", "rollout.engine=hf",
        "algo.prompts_per_step=4", "algo.group_size=4", "train.global_batch_size=8", "algo.max_new_tokens=40",
        "algo.updates_per_rollout=2", "algo.beta=0.04", "optim.lr=1e-3", "optim.warmup_steps=0", *LORA]
IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 12, 40], [9, 7, 9, 3, 2, 38, 4, 6, 20, 11]])


@pytest.mark.distributed
def test_qlora_grpo_step_does_not_depend_on_the_world_size(tmp_path, sft_tiny):
    """NF4 base sharded over 2 gloo ranks (FSDP2 all-gathers it packed) vs kept whole on 1 rank, micro-batch 4 vs 2:
    the same rollouts, and losses, KL (reference = adapters off), entropies and gradient norms to 1e-5 relative.
    The transformers engine generates with the trainer's own modules (rollout/shared.py): on 2 ranks every rank
    gathers them for its rollout and for the evaluation that rank 1 alone runs after each step (no hang)."""
    common = [*GRPO, f"model.path={sft_tiny}", "hardware.load_in_4bit=true", "train.max_steps=2", "optim.schedule=constant",
              "eval.tasks=[arithmetic]", "eval.every_steps=1", "eval.limit=4", "eval.max_new_tokens=8"]
    shared = "rollout engine: transformers, on the trainer's own modules"
    assert shared in run_train([*common, f"run_dir={tmp_path / 'np1'}", "train.micro_batch_size=4"]).stderr
    assert shared in run_train([*common, f"run_dir={tmp_path / 'np2'}", "train.micro_batch_size=2"], nproc=2).stderr
    logged = read_metrics(tmp_path / "np1"), read_metrics(tmp_path / "np2")
    one, two = ([r for r in rows if "train/loss" in r] for rows in logged)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in ("reward/mean", "rollout/completion_length_mean"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy"):
            assert _close(a[key], b[key]), (key, a[key], b[key])
    assert one[-1]["train/kl"] > 0 and one[-1]["train/grad_norm"] > 0  # the adapters moved away from the base
    for rows in logged:  # rank 0 alone (np1), rank 1 while rank 0 waited (np2): evaluated after each step
        assert [r["step"] for r in rows if "eval/arithmetic/accuracy" in r] == [1, 2], rows


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _export(ckpt: Path, tmp_path: Path) -> None:
    """The offline export of a LoRA checkpoint: adapter to tmp_path/ad, merged model to tmp_path/merged."""
    out = subprocess.run([sys.executable, "-m", "grpo_fsdp.export", str(ckpt), str(tmp_path / "ad"), "merge=true",
                          f"merged_dir={tmp_path / 'merged'}"], cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


def _kill_and_resume(tmp_path: Path, sft_tiny: Path, extra: list[str]) -> Path:
    common = [*GRPO, f"model.path={sft_tiny}", "train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=3",
              *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train([*common, f"run_dir={straight}", "checkpoint.export_hf=true"])
    killed = run_train([*common, f"run_dir={resumed}", "checkpoint.resume=auto"], env={"GRPO_FSDP_FAULT": "after_step:2"},
                       check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    proc = run_train([*common, f"run_dir={resumed}", "checkpoint.resume=auto"])
    assert f"resumed at step 2 from {_step(resumed, 2)}\n" in proc.stdout
    a, b = _numbers(read_metrics(straight)), _numbers(read_metrics(resumed))
    assert [r["step"] for r in b] == [1, 2, 3] and a == b  # exact
    # step 2 moved the adapters (the first rewarded samples), so step 3 starts from restored adapters and AdamW moments
    assert a[1]["train/grad_norm"] > 0 and a[2]["train/kl"] > 0
    return straight


@pytest.mark.slow  # 46 s; the QLoRA case below runs the same resume path (plus NF4), test_export_lora.py the PEFT load
def test_lora_kill_and_resume_is_bit_identical_and_exports_load_in_peft(tmp_path, sft_tiny):
    """fp32 base. The checkpoint holds the adapters and their optimizer state only (megabytes, not the model); the
    run's PEFT adapter on the SFT base in `peft` gives the logits of its merged export, which the offline export of
    the last checkpoint (merge=true) reproduces."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from grpo_fsdp.checkpoint import SafeFileSystemReader

    run = _kill_and_resume(tmp_path, sft_tiny, [])
    keys = SafeFileSystemReader(str(_step(run, 3))).read_metadata().state_dict_metadata
    assert {k for k in keys if k.startswith("model.")} == {k for k in keys if k.startswith("model.") and ".lora_" in k}
    merged = _logits(AutoModelForCausalLM.from_pretrained(run / "hf"))
    assert (merged - _logits(AutoModelForCausalLM.from_pretrained(sft_tiny))).abs().max() > 1e-4  # it trained
    with_adapter = _logits(peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_tiny), run / "adapter"))
    torch.testing.assert_close(with_adapter, merged, rtol=0, atol=2e-5)
    _export(_step(run, 3), tmp_path)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_tiny)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), merged, rtol=0, atol=2e-5)


def test_qlora_kill_and_resume_is_bit_identical_and_the_merged_export_loads(tmp_path, sft_tiny):
    """NF4 base: the base is rebuilt (and re-quantized, deterministically) at the resume. The merged export (into the
    dequantized NF4 weights the run trained with) loads with AutoModelForCausalLM, and the offline merge of the last
    checkpoint, which quantizes the base again the same way, gives the same logits."""
    from transformers import AutoModelForCausalLM

    run = _kill_and_resume(tmp_path, sft_tiny, ["hardware.load_in_4bit=true"])
    merged = _logits(AutoModelForCausalLM.from_pretrained(run / "hf"))
    _export(_step(run, 3), tmp_path)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), merged, rtol=0, atol=2e-5)
