"""`make demo`: the main job on the embedded default, on a laptop CPU.

Today it runs SFT of the tiny model on synthetic arithmetic into `outputs/demo` (resuming if a
previous demo was interrupted); the GRPO stage that follows SFT arrives with the GRPO recipe.
Extra arguments are Hydra overrides: `make demo ARGS="train.max_steps=20"`.
"""

from __future__ import annotations

import sys

from grpo_fsdp.cli import run_main
from grpo_fsdp.train import main


def demo(args: list[str]) -> int:
    return main(["run_dir=outputs/demo", "checkpoint.resume=auto", *args])


if __name__ == "__main__":
    run_main(demo, sys.argv[1:])
