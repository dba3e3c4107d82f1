"""The gpu8gb profile on a GPU (`-m gpu`): LoRA on an NF4 base in bf16, CPU offload (process group
cpu:gloo,cuda:nccl), activation checkpointing. SFT learns, and GRPO steps run with the KL reference as the
adapters-off base and the merged-weight sync passing the probe at bf16 tolerance. Not run on CPU machines."""

import pytest
import torch
from conftest import SMALL, read_metrics, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu8gb_profile_qlora_trains_on_gpu(tmp_path):
    pytest.importorskip("torchao")
    sft = tmp_path / "sft"
    run_train([*SMALL, "hardware=gpu8gb", f"run_dir={sft}", "train.max_steps=20", "optim.lr=1e-2",
               "hardware.lora.target_modules=[all-linear]"])
    rows = read_metrics(sft)
    assert rows[-1]["train/loss"] < 0.9 * rows[0]["train/loss"]
    assert rows[-1]["system/rank0/cuda_max_allocated_gib"] > 0
    grpo = tmp_path / "grpo"
    run_train([*SMALL, "hardware=gpu8gb", "algo=grpo", "rollout.engine=hf", f"run_dir={grpo}", "train.max_steps=2",
               "algo.prompts_per_step=4", "algo.group_size=4", "train.global_batch_size=16", "train.micro_batch_size=4",
               "algo.max_new_tokens=16", "algo.beta=0.04", "checkpoint.export_hf=true"])
    rows = read_metrics(grpo)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/probe_max_abs_diff"] <= 0.1 for r in rows)  # LoRA: probed at every sync
    assert (grpo / "adapter" / "adapter_model.safetensors").exists() and (grpo / "hf" / "config.json").exists()
