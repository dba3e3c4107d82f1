#!/usr/bin/env bash
# Single-node launcher: launch/train.sh [hydra overrides...]
#
#   launch/train.sh hardware=h100x2 model=qwen2.5-math-1.5b data=gsm8k
#   NPROC=1 launch/train.sh dry_run=true
#
# Processes per node: $NPROC if set; otherwise the hardware profile's nproc_per_node (composed
# from the same overrides, so hardware=h100x2 gives 2), capped by the GPUs nvidia-smi lists so a
# 2-GPU profile still starts on a 1-GPU box. Multi-node runs use launch/slurm.sbatch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prefer the project's virtual environment; fall back to whatever python is on PATH (Docker).
if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
if [[ -x "$ROOT/.venv/bin/torchrun" ]]; then
    TORCHRUN=("$ROOT/.venv/bin/torchrun")
elif command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=(torchrun)
else
    TORCHRUN=("$PY" -m torch.distributed.run)
fi

if [[ -n "${NPROC:-}" ]]; then
    n="$NPROC"
else
    # A config mistake falls back to 1 here on purpose: the trainer then reports it in one line.
    n="$("$PY" -c 'import sys
from grpo_fsdp.cli import compose
print(compose(sys.argv[1:]).hardware.nproc_per_node)' "$@" 2>/dev/null || echo 1)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        if [[ "${gpus:-0}" -gt 0 && "$n" -gt "$gpus" ]]; then
            echo "train.sh: profile asks for $n processes but $gpus GPU(s) are present; using $gpus" >&2
            n="$gpus"
        fi
    fi
fi

exec "${TORCHRUN[@]}" --standalone --nproc_per_node="$n" -m grpo_fsdp.train "$@"
