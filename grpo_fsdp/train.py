"""Entry point: compose the config, validate it, then run the recipe named by `algo=`.

    python -m grpo_fsdp.train                                   # embedded default (tiny model, CPU)
    python -m grpo_fsdp.train dry_run=true hardware=h100x2 model=qwen2.5-math-1.5b data=gsm8k
    torchrun --nproc_per_node=2 -m grpo_fsdp.train hardware=h100x2 model=qwen2.5-math-1.5b data=gsm8k

Configuration mistakes are refused here, before any process group, weight or data set is touched.
"""

from __future__ import annotations

import importlib
import os
import sys

from grpo_fsdp.cli import compose, run_main
from grpo_fsdp.config import Config
from grpo_fsdp.validation import validate

RECIPES = {"sft": "grpo_fsdp.recipes.sft", "grpo": "grpo_fsdp.recipes.grpo", "dpo": "grpo_fsdp.recipes.dpo"}


def dry_run(cfg: Config, world_size: int) -> str:
    """The batch-semantics table and the per-GPU memory estimate, as printed by dry_run=true."""
    from grpo_fsdp.estimate import estimate_memory
    from grpo_fsdp.estimate_table import format_table
    from grpo_fsdp.plan import BatchPlan

    header = f"config ok: hardware={cfg.hardware.name} model={cfg.model.name} data={cfg.data.name} algo={cfg.algo.name} world_size={world_size}"
    plan = BatchPlan.from_config(cfg, world_size).format_table()
    memory = format_table(estimate_memory(cfg, world_size), cfg.hardware.gpu_memory_gib, cfg)
    return f"{header}\n\n{plan}\n\n{memory}"


def main(overrides: list[str]) -> int:
    import torch

    from grpo_fsdp.distributed import launched_world_size
    from grpo_fsdp.hydra_flags import dispatch

    if (code := dispatch(overrides, main)) is not None:  # --help, --cfg job, -m sweeps (hydra_flags.py)
        return code
    cfg = compose(overrides)
    # under torchrun the real world size counts; a dry run outside it assumes the profile's
    world = launched_world_size() if "WORLD_SIZE" in os.environ else (cfg.hardware.nproc_per_node if cfg.dry_run else 1)
    validate(cfg, world, torch.cuda.is_available())
    if cfg.dry_run:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one copy of the tables
            print(dry_run(cfg, world))
        return 0
    recipe = importlib.import_module(RECIPES[cfg.algo.name])
    return recipe.run(cfg)  # the recipe owns its teardown, process group last (recipes/teardown.py)


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
