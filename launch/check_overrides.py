"""Launcher check: compose and validate the overrides, then print the processes per node.

    python launch/check_overrides.py [--nproc=N] [hydra overrides...]     # prints e.g. 2

launch/train.sh and launch/train.ps1 run this before torchrun, so a mistake (a typo, a cuda
profile on a machine without GPUs) ends here in one line with exit code 2, instead of once per
rank under torchrun's ChildFailedError. Processes: --nproc when > 0, else the hardware profile's
nproc_per_node, capped by the GPUs torch sees (a 2-GPU profile still starts on a 1-GPU box).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not pip-installed

from grpo_fsdp.cli import compose, run_main


def nproc_per_node(overrides: list[str], requested: int, gpus: int, cuda_available: bool) -> int:
    from grpo_fsdp.validation import validate

    cfg = compose(overrides)
    n = requested or cfg.hardware.nproc_per_node
    if not requested and cfg.hardware.device == "cuda" and 0 < gpus < n:
        print(f"launch: profile asks for {n} processes but {gpus} GPU(s) are present; using {gpus}", file=sys.stderr)
        n = gpus
    validate(cfg, n, cuda_available)
    return n


def main(args: list[str]) -> int:
    import torch

    from grpo_fsdp.config import ConfigError
    from grpo_fsdp.hydra_flags import parse_flags

    requested = 0
    if args and args[0].startswith("--nproc="):
        requested = int(args.pop(0).split("=", 1)[1] or 0)
    flags = parse_flags(args)
    if flags.multirun:
        raise ConfigError("--multirun", "sweeps run one job after another in one process, not under the launchers",
                          "run them with python -m grpo_fsdp.train -m ...")
    if flags.help or flags.cfg:  # the trainer prints them; one process is enough
        print(1)
        return 0
    print(nproc_per_node(flags.overrides, requested, torch.cuda.device_count(), torch.cuda.is_available()))
    return 0


if __name__ == "__main__":
    run_main(main)
