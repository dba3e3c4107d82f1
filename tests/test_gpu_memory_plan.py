"""GPU check of the memory plan (issue 14 item 7, `-m gpu`): one GRPO step of the Qwen2.5-1.5B architecture cut to 4
layers (random weights; the full vocabulary and width, so the LM head, embeddings and the engine's copy are real
sizes, in a few seconds of start-up) at the 8 GB preset's settings with LoRA on an NF4 base, and the plan within
10% of what torch's CUDA allocator handed out at its peak (`torch.cuda.max_memory_allocated`; the plan's
CUDA-context line is left out, the allocator never sees it). Runs benchmarks/qlora_memory.py (the 28-layer
variants are its `qlora-memory` line in gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_qlora_plan_within_10_percent_of_cuda_max_allocated(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/qlora_memory.py", "--model", "qwen2.5-1.5b", "--device", "cuda",
                           "--variants", "qlora", "--prompt-len", "64", "--max-new-tokens", "64", "--out", str(tmp_path), "--",
                           "model.arch.num_layers=4"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (doc,) = tmp_path.glob("qlora_memory-*.json")
    (r,) = json.loads(doc.read_text())["runs"][-1]["variants"]
    assert r["measure"] == "torch.cuda.max_memory_allocated"
    plan, measured = r["plan"]["compare_bytes"], r["measured_bytes"]
    assert abs(plan - measured) <= 0.10 * measured, (plan / 2**30, measured / 2**30, r["plan"])
