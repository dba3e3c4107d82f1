"""One W&B run shared by every rank: rank 0 creates it, the others join it under the same id.

How the ranks meet (`make_logger` in logging.py drives this, collectively):
  1. rank 0 reads the run id from `<run_dir>/wandb_id.txt` (a resumed run keeps its id) or makes a
     new one, opens its W&B run, and only then broadcasts the id (`distributed.broadcast_object`);
  2. every other rank opens a run with that id, labelled `rank{r}`.
Each writer logs only its own keys: rank 0 the training row, rank r its `system/rank{r}/...`
metrics and, on the eval rank, the `eval/...` results. So no two writers ever log the same key.

Two W&B mechanisms, chosen by the mode W&B resolves from WANDB_MODE / `wandb offline` (an explicit
`mode=` in `wandb.init` would override the user's choice, so we read it first and keep it):

* online, world size > 1: W&B's shared mode (`mode="shared"`, experimental in wandb 0.31). Every
  writer streams into the one run live; rank 0 is `x_primary` (it writes run files and metadata)
  and the only writer allowed to mark the run finished (`x_update_finish_state`).
* offline (and online with one process): an ordinary run per process under the same id. Shared mode
  has no offline form: it needs the server to merge writers, and replaying a shared-mode `.wandb`
  file with `wandb sync` duplicates points (newer wandb refuses to). Each rank writes
  `<run_dir>/wandb/offline-run-<time>-<id>[-rank{r}]/` (the suffix keeps two ranks that start in the
  same second out of one directory; only rank 0 moves `wandb/latest-run`), and
  `wandb sync <run_dir>/wandb` groups the files by run id and uploads them one after another in
  start-time order (wandb 0.31 documents this for resumed runs), rank 0's first (it starts before
  the id is broadcast), each later file appended to the same run: ONE run on the server.

Step alignment. W&B's own `_step` is a per-writer row counter: in shared mode the server assigns it
(and ignores `log(step=...)`), and offline each file counts its own. It cannot line up rows from
different ranks, so every row carries the optimizer step as `train/step`, and `define_metric` makes
`train/step` the x-axis of every namespace. Rank 1's eval row for step 2 therefore sits at
train/step = 2 in the charts however late it was logged. Rank 0 in an ordinary (non-shared) run also
passes `step=` so its `_step` equals the optimizer step, as before; other ranks never do, because a
late eval row with a smaller `step=` would be dropped by W&B (steps must grow per writer).

Caveats (wandb 0.31): shared mode is marked experimental. After an offline sync, rows from ranks
other than 0 follow rank 0's rows in the run's history with their own small `_step` values, so
charts must use `train/step` (the defined x-axis does) rather than `_step`; and the run summary may
show the last uploaded file's values for keys it has. W&B's own sampled system stats
(`system.*`, not ours) are labelled per writer (`x_label`) in both mechanisms. Neither mechanism has
met a W&B server in our tests (no network): tests/test_shared_wandb.py reads the offline files.
"""

from __future__ import annotations

import os
import secrets
import string
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grpo_fsdp.config import LoggingConfig
from grpo_fsdp.metrics_file import NAMESPACES
from grpo_fsdp.redaction import redact, redact_args

STEP_KEY = "train/step"
_ID_CHARS = string.ascii_lowercase + string.digits


def read_or_create_run_id(run_dir: Path) -> str:
    """The id in `<run_dir>/wandb_id.txt`, created on first use: a resumed run keeps its W&B run."""
    path = run_dir / "wandb_id.txt"
    run_id = path.read_text().strip() if path.exists() else ""
    if not run_id:
        # Our own 8-char base-36 id, W&B's format: wandb 0.31 no longer exports generate_id.
        run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        tmp.replace(path)
    return run_id


def _parse_config(config_yaml: str) -> dict:
    import yaml

    try:
        parsed = yaml.safe_load(config_yaml)
    except yaml.YAMLError:  # W&B then shows no config; config.yaml still holds the text
        return {}
    return parsed if isinstance(parsed, dict) else {}


@contextmanager
def _argv_redacted() -> Iterator[None]:
    """W&B records `sys.argv[1:]` in the run's metadata (its `_args` setting, read when `wandb.init`
    sends the settings to wandb-core), and `wandb sync` uploads it: a key given on the command line
    would sit in the offline `.wandb` file. Show W&B a redacted argv for the length of `init` only."""
    saved = sys.argv[:]
    sys.argv[1:] = redact_args(saved[1:])
    try:
        yield
    finally:
        sys.argv[:] = saved


def resolved_mode() -> str:
    """The mode W&B would use without an explicit `mode=`: "online", "offline" or "disabled"."""
    import wandb  # imported here: it is slow to import and most test runs never need it

    mode = wandb.setup().settings.mode
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


class WandbWriter:
    """One process's handle on the shared run: logs rows with `train/step`, finishes its part."""

    def __init__(self, run, pass_step: bool):
        self.run = run
        self.id: str = run.id
        self._pass_step = pass_step

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log({**values, STEP_KEY: int(step)}, step=int(step) if self._pass_step else None)

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def open_run(
    *,
    rank: int,
    world_size: int,
    run_id: str,
    run_dir: Path,
    cfg: LoggingConfig,
    config_yaml: str,
    name: str,
) -> WandbWriter:
    """Open this rank's writer on run `run_id` (see the module docstring for which mechanism)."""
    import wandb

    if rank > 0:
        # A wandb-core service holds one stream per run id, so two writers of this run cannot share
        # one ("run ID ... is in use"). A WANDB_SERVICE inherited from a parent that called
        # wandb.setup() (or set by hand) is therefore left to rank 0; the others start their own.
        os.environ.pop("WANDB_SERVICE", None)
    config = redact(_parse_config(config_yaml))  # config.yaml is redacted already; a caller's own yaml may not be
    config.setdefault("world_size", world_size)
    mode = resolved_mode()
    shared = world_size > 1 and mode == "online"
    settings: dict[str, Any] = {
        "x_label": f"rank{rank}",  # W&B's own system stats and console lines, per writer
        "x_primary": rank == 0,  # only rank 0 writes run files and metadata
        "x_update_finish_state": rank == 0,  # a worker finishing does not finish the run
    }
    if shared:
        settings["mode"] = "shared"
    elif rank > 0:
        settings["x_sync_dir_suffix"] = f"rank{rank}"  # never rank 0's directory, whatever the clock
        settings["symlink"] = False  # wandb/latest-run keeps pointing at rank 0's run
    with _argv_redacted():
        run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            name=name,
            dir=str(run_dir),
            # Every rank sends the same config: an offline sync uploads each file's run record in turn,
            # and a worker with an empty config would otherwise blank the run's config.
            config=config,
            id=run_id,
            resume="allow" if rank == 0 or not shared else None,
            settings=wandb.Settings(**settings),
        )
    run.define_metric(STEP_KEY)
    for namespace in NAMESPACES:
        run.define_metric(namespace + "*", step_metric=STEP_KEY)
    return WandbWriter(run, pass_step=rank == 0 and not shared)
