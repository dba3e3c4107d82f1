"""`data.curriculum=auto`: the SENT ordering of the training prompts, computed before training when its file is missing.

Rank 0 runs the curriculum tool's `compute` (tool.py) with the run's own configuration: data.curriculum_samples
answers per training prompt from the rollout engine at temperature 1, into data.curriculum_file (empty: the
tool's default, outputs/curriculum/<data>-<key hash>.jsonl). A complete file for this model, data, M and seed
costs no sampling; a partial one (an interrupted run) is resumed; one computed for another model, data, M or
seed is moved aside to <file>.stale and recomputed (cache.py). The other ranks wait at the broadcast of the path,
so the sampling must end within hardware.collective_timeout_s: for a large data set run
`python -m grpo_fsdp.curriculum` first and pass data.curriculum=sent. Then the run is data.curriculum=sent.
"""

from __future__ import annotations

import dataclasses

from grpo_fsdp import distributed
from grpo_fsdp.cli import UserError
from grpo_fsdp.config import Config, DataConfig


def resolve(cfg: Config, is_main: bool) -> DataConfig:
    """cfg.data, with `auto` replaced by `sent` and the file computed on rank 0 (a collective when auto)."""
    d = cfg.data
    if d.curriculum != "auto":
        return d
    path = error = None
    if is_main:
        from grpo_fsdp.curriculum.tool import compute

        try:
            path = str(compute(cfg, d.curriculum_samples, cfg.train.seed, d.curriculum_file or None))
        except Exception as e:  # noqa: BLE001  told to the other ranks first, so they do not wait for the timeout
            error = e
    path = distributed.broadcast_object(path if error is None else None)
    if error is not None:
        raise error
    if path is None:
        raise UserError("data.curriculum=auto: rank 0 failed computing the curriculum (its error is above)")
    return dataclasses.replace(d, curriculum="sent", curriculum_file=path)
