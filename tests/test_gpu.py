"""GPU checks (`-m gpu`, on a machine with CUDA): bf16 FSDP2 training with the h100x2 profile's
settings on one device, FlashAttention-2 falling back to SDPA where flash-attn is absent."""

import pytest
import torch
from conftest import SMALL, read_metrics, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_full_shard_training_learns_on_gpu(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*SMALL, "hardware=h100x2", "hardware.compile=false", f"run_dir={run_dir}", "train.max_steps=30"])
    rows = read_metrics(run_dir)
    assert rows[-1]["train/loss"] < 0.5 * rows[0]["train/loss"]
    assert rows[-1]["system/rank0/cuda_max_allocated_gib"] > 0


def test_compiled_blocks_match_eager_on_gpu(tmp_path):
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    run_train([*SMALL, "hardware=h100x2", "hardware.compile=false", f"run_dir={eager}", "train.max_steps=3"])
    run_train([*SMALL, "hardware=h100x2", "hardware.compile=true", f"run_dir={comp}", "train.max_steps=3"])
    for x, y in zip(read_metrics(eager), read_metrics(comp)):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=2e-2)  # bf16: kernels differ
