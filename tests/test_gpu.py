"""GPU checks (`-m gpu`, on a machine with CUDA): bf16 FSDP2 training with the h100x2 profile's
settings on one device, FlashAttention-2 falling back to SDPA where flash-attn is absent, and GRPO
steps with the transformers engine (what benchmarks/grpo_step.py times)."""

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


def test_grpo_steps_with_forced_lengths_on_gpu(tmp_path):
    run_dir = tmp_path / "grpo"
    run_train([*SMALL, "hardware=h100x2", "hardware.compile=false", "algo=grpo", "rollout.engine=hf", f"run_dir={run_dir}",
               "train.max_steps=2", "algo.prompts_per_step=4", "algo.group_size=4", "train.global_batch_size=16",
               "train.micro_batch_size=4", "algo.max_new_tokens=16", "algo.ignore_eos=true", "algo.filter_zero_variance=false",
               "checkpoint.save_final=false", "checkpoint.export_hf=false", "logging.progress_bar=false"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/completion_length_mean"] == r["rollout/completion_length_max"] == 16 for r in rows)
    assert rows[0]["rollout/probe_max_abs_diff"] <= 0.1  # the engine shares the trainer's bf16 modules
    assert all(r["perf/train_seconds"] > 0 and r["system/rank0/cuda_max_allocated_gib"] > 0 for r in rows)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
