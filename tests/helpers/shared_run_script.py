"""Two ranks log into one W&B run as the trainer does (tests/test_shared_wandb.py runs this):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers/shared_run_script.py RUN_DIR

Every rank logs three training steps (loss 1/step, lr 0.1*step; rank 1 drops those keys, as in the
recipes) and rank 1, the eval rank, logs eval results for step 2 after step 2's row, the way eval runs
between steps. Ends with `ids.json`: the W&B run id each rank's logger holds.
"""

import json
import sys

import torch.distributed as dist

from grpo_fsdp import distributed
from grpo_fsdp.config import LoggingConfig
from grpo_fsdp.logging import make_logger

CONFIG_YAML = "model:\n  name: tiny\ntrain:\n  max_steps: 3\n"


def main(run_dir: str) -> None:
    d = distributed.init("cpu")
    logger = make_logger(
        d.rank,
        run_dir=run_dir,
        cfg=LoggingConfig(wandb=True, progress_bar=False),
        config_yaml=CONFIG_YAML,
        total_steps=3,
        run_name="shared",
        world_size=d.world_size,
        device=d.device,
    )
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": 1.0 / step, "train/lr": 0.1 * step})
        if step == 2 and d.rank == d.eval_rank:  # the evaluator runs on the eval rank only
            logger.log_eval(step, {"eval/arith/accuracy": 0.625, "eval/arith/count": 16})
    logger.close()
    ids = [None] * d.world_size
    dist.all_gather_object(ids, logger.wandb_run_id)
    if d.rank == 0:
        with open(f"{run_dir}/ids.json", "w") as f:
            json.dump(ids, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
