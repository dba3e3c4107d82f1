"""SIGTERM (Slurm preemption, `scancel`, a spot reclaim) turns into a flag the loop checks.

The handler only records the signal; the loop agrees on it across ranks at the next step boundary
(`distributed.any_rank`), saves a checkpoint and exits 0, so a requeued job resumes with
`checkpoint.resume=auto`.

After that save, `Preemption.saved` gives the console line, which names the exact command that
resumes (the same overrides plus `checkpoint.resume=auto run_dir=<run_dir>`), and rank 0 writes it
to the file named by `$GRPO_FSDP_PREEMPT_MARKER` when a launcher set one. torchrun itself exits 1
when it is signalled, even after every worker saved and exited 0 (its agent re-raises the signal
as `SignalException`); `launch/train.sh` reads the marker to return 0 after a clean save, and exits
with torchrun's code otherwise.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

MARKER_ENV = "GRPO_FSDP_PREEMPT_MARKER"  # set by launch/train.sh: a file that says "saved cleanly"
LAUNCHER_ENV = "GRPO_FSDP_LAUNCHER"  # set by launchers: how the user started us, for the resume command


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def saved(self, step: int, checkpoint: str | Path, run_dir: str, rank: int) -> str:
        """Call on every rank after the SIGTERM checkpoint is complete: the console line, and rank 0's marker."""
        command = resume_command(run_dir)
        if rank == 0 and (marker := os.environ.get(MARKER_ENV)):
            Path(marker).write_text(f"{step}\t{checkpoint}\t{command}\n")
        return f"SIGTERM: saved checkpoint at step {step} in {checkpoint}; exiting with code 0. Resume with: {command}"

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def resume_command(run_dir: str, argv: list[str] | None = None) -> str:
    """The command that continues this run: this launch's overrides, with the resume mode and run
    directory pinned (so it works whatever default run directory a new launch would pick)."""
    args = sys.argv[1:] if argv is None else argv
    kept = [a for a in args if a.lstrip("+~").split("=", 1)[0] not in ("checkpoint.resume", "run_dir")]
    pinned = shlex.join([*kept, "checkpoint.resume=auto", f"run_dir={run_dir}"])
    if launcher := os.environ.get(LAUNCHER_ENV):
        return f"{launcher} {pinned}"
    if Path(sys.argv[0]).as_posix().endswith("grpo_fsdp/train.py"):
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return f"python -m grpo_fsdp.train {pinned}"
        local, world = os.environ.get("LOCAL_WORLD_SIZE", "1"), os.environ.get("WORLD_SIZE", "1")
        nodes = "--standalone" if local == world else f"--nnodes={int(world) // int(local)} <your rendezvous flags>"
        return f"torchrun {nodes} --nproc_per_node={local} -m grpo_fsdp.train {pinned}"
    return f"the same command with {shlex.join(['checkpoint.resume=auto', f'run_dir={run_dir}'])}"
