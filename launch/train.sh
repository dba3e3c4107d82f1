#!/usr/bin/env bash
# Single-node launcher: launch/train.sh [hydra overrides...]
#
#   launch/train.sh hardware=h100x2 model=qwen2.5-math-1.5b data=gsm8k
#   NPROC=1 launch/train.sh dry_run=true
#
# Processes per node: $NPROC if set; otherwise the hardware profile's nproc_per_node (composed
# from the same overrides, so hardware=h100x2 gives 2), capped by the GPUs torch sees so a
# 2-GPU profile still starts on a 1-GPU box. Multi-node runs use launch/slurm.sbatch.
#
# Before torchrun starts, launch/check_overrides.py composes and validates the overrides: a mistake (a
# typo, a cuda profile on a machine without GPUs) is one line and exit code 2, not one per rank
# under torchrun's ChildFailedError.
#
# Exit code: the trainer's, with one exception. SIGTERM (to this script or to torchrun) makes
# every rank save a checkpoint and exit 0, but torchrun itself then exits 1 (it re-raises the
# signal). The trainer writes a marker file after a clean save; if it is there, this script exits
# 0 and repeats the command that resumes. torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (default here 100; torchrun's own is 30) for the ranks to reach the end of their step and save
# before it SIGKILLs them; then no marker is written and the exit code stays non-zero.
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

# Compose + validate (one line and exit 2 on a mistake) and print the number of processes.
n="$("$PY" "$ROOT/launch/check_overrides.py" --nproc="${NPROC:-0}" "$@")" || exit $?

MARKER="$(mktemp "${TMPDIR:-/tmp}/grpo-fsdp-preempted.XXXXXX")"
rm -f "$MARKER"  # the trainer creates it only after a clean SIGTERM save
trap 'rm -f "$MARKER"' EXIT
export GRPO_FSDP_PREEMPT_MARKER="$MARKER"
export GRPO_FSDP_LAUNCHER="${NPROC:+NPROC=$NPROC }$0"  # how the resume command in the SIGTERM message starts
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"

# torchrun in the background so that a SIGTERM to this script is forwarded (bash runs traps only
# between commands); torchrun passes it to every rank.
"${TORCHRUN[@]}" --standalone --nproc_per_node="$n" -m grpo_fsdp.train "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
while :; do
    rc=0
    wait "$pid" || rc=$?
    # above 128 with torchrun still alive: the trap interrupted `wait`; keep waiting for the save
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
done

if [[ "$rc" != 0 && -s "$MARKER" ]]; then
    IFS=$'\t' read -r step ckpt command <"$MARKER"
    echo "train.sh: preempted; every rank saved step $step in $ckpt (torchrun exited $rc because it was signalled); exit 0. Resume with: $command" >&2
    exit 0
fi
exit "$rc"
