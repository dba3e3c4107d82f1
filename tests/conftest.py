"""Shared helpers: run the trainer as a user would (a subprocess, optionally under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# A model and batch small enough for 2 CPU cores; every trainer test starts from these.
SMALL = [
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128",
    "model.arch.num_layers=2",
    "data.arithmetic.num_train=256",
    "data.max_prompt_length=128",
    "data.max_length=192",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "optim.warmup_steps=1",
    "logging.progress_bar=false",
    "checkpoint.export_hf=false",
    # vLLM's CPU build cannot serve 16-wide heads, and `auto` learns that only by importing it (~5 s a process,
    # a third of a short trainer run): tests that want vLLM name it and a shape it serves (test_grpo_vllm.py)
    "rollout.engine=hf",
]


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def train_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "grpo_fsdp.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "grpo_fsdp.train", *overrides]


def run_train(overrides: list[str], nproc: int = 1, env: dict | None = None, check: bool = True, timeout: int = 600):
    proc = subprocess.run(train_cmd(overrides, nproc), cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def start_train(overrides: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(overrides, nproc), cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: a 64-wide model gains nothing from more, and OpenMP
    threads that spin-wait on a loaded 2-core machine made test_rollout_hf 10x slower (85 s vs 7 s,
    measured). Restored after the module. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent (a fresh clone without the shared folder)")
    return path


@pytest.fixture
def qwen_tokenizer_dir() -> Path:
    path = SHARED / "tokenizers" / "qwen2.5"
    if not path.is_dir():
        pytest.skip("../shared/tokenizers/qwen2.5 is absent (a fresh clone without the shared folder)")
    return path


# A toy task for the SMALL model: sums of 2-3 operands in 0..9, no instruction after the question.
TOY = ["data.arithmetic.max_operand=9", "data.arithmetic.ops=[+]", "data.arithmetic.num_train=256", "data.arithmetic.num_test=50",
       "data.instruction=''"]


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory) -> Path:
    """The SMALL model after SFT on TOY, exported as a Hugging Face directory (the GRPO tests' start)."""
    run_dir = tmp_path_factory.mktemp("sft_tiny") / "run"
    run_train([*SMALL, *TOY, f"run_dir={run_dir}", "train.max_steps=80", "train.global_batch_size=16", "train.micro_batch_size=16",
               "optim.lr=3e-3", "checkpoint.export_hf=true"])
    return run_dir / "hf"
