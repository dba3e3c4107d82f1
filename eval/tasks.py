"""The evaluation tasks by name, each resolved to a `DataConfig` and loaded by the training loader.

    gsm8k       GSM8K test split, 1,319 problems (Cobbe et al. 2021)
    math        MATH test split, all 5,000 problems (Hendrycks et al. 2021), levels 1-5, 7 subjects
    math500     MATH-500, the 500-problem subset of Lightman et al. (2023)
    arithmetic  the synthetic task's test split, so the tiny demo model can be evaluated meaningfully

Where the rows come from: with `data_dir` set, a local JSONL file below it (the layout of
`../shared/data`: gsm8k/test.jsonl, math/test.jsonl, math/math500.jsonl); otherwise the hub id of
`conf/data/<name>.yaml`, the same source a training run with data=<name> reads. Rows are parsed by
`grpo_fsdp.data.loading.load_examples`, so a malformed row is skipped and reported the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import OmegaConf

from grpo_fsdp.cli import CONF_DIR, UserError
from grpo_fsdp.config import ArithmeticConfig, ConfigError, DataConfig
from grpo_fsdp.data.loading import load_examples
from grpo_fsdp.data.records import Example


@dataclass(frozen=True)
class Task:
    name: str
    data: str  # conf/data/<data>.yaml: the loader's data.name and hub id
    split: str
    local_file: str  # below data_dir; "" for the synthetic task
    max_new_tokens: int  # default generation budget, tokens
    description: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("gsm8k", "gsm8k", "test", "gsm8k/test.jsonl", 512, "GSM8K test, 1,319 problems"),
        Task("math", "math", "test", "math/test.jsonl", 1024, "MATH test, 5,000 problems"),
        Task("math500", "math500", "test", "math/math500.jsonl", 1024, "MATH-500, 500 problems"),
        Task("arithmetic", "arithmetic", "test", "", 64, "synthetic arithmetic, test split"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError("tasks", f"unknown task {name!r}", f"choose from {', '.join(TASKS)}")
    return TASKS[name]


def data_config(task: Task, data_dir: str = "", arithmetic: ArithmeticConfig | None = None) -> DataConfig:
    """conf/data/<task.data>.yaml as a DataConfig, pointed at data_dir's file when data_dir is set."""
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF_DIR / "data" / f"{task.data}.yaml"))
    cfg: DataConfig = OmegaConf.to_object(node)
    if arithmetic is not None:
        cfg.arithmetic = arithmetic
    if data_dir and task.local_file:
        path = os.path.join(os.path.expanduser(data_dir), task.local_file)
        if not os.path.isfile(path):
            raise UserError(f"data_dir={data_dir!r} holds no {task.local_file} for task {task.name}; "
                            f"add the file or leave data_dir empty to read hub {cfg.hub_id!r}")
        cfg.path = path
    return cfg


def load_task(name: str, data_dir: str = "", limit: int = 0, arithmetic: ArithmeticConfig | None = None) -> list[Example]:
    """The first `limit` problems of task `name` (0: all), in file order."""
    if limit < 0:
        raise ConfigError("limit", f"must be >= 0, got {limit}", "use 0 for every problem")
    task = get_task(name)
    return load_split(task, data_config(task, data_dir, arithmetic), limit)


def load_split(task: Task, cfg: DataConfig, limit: int = 0) -> list[Example]:
    """`load_examples` for the task's split; a hub failure also names the evaluator's data_dir option."""
    try:
        return load_examples(cfg, task.split, limit=limit)
    except UserError as e:
        if cfg.path or not task.local_file:
            raise
        raise UserError(f"{e} (for the evaluator: data_dir=<folder holding {task.local_file}>)") from None
