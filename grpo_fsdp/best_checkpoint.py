"""The `best` checkpoint and the `latest` pointer beside the step_* checkpoints (issue 16, item 3).

    <run_dir>/checkpoints/step_000100/  step_000120/   the last `checkpoint.keep_last`, pruned as before
    <run_dir>/checkpoints/best/                         the step whose `checkpoint.best_metric` was best
    <run_dir>/checkpoints/latest.json                   {"step": 120, "path": "/abs/.../step_000120",
                                                         "name": "step_000120"}   (name: beside latest.json, if moved)

`best/` is a complete checkpoint (same files, MANIFEST and COMPLETE, plus BEST.json: metric, mode,
value, step), so `checkpoint.resume=<run_dir>/checkpoints/best` and `grpo_fsdp.export` take it as
they take any step_* directory. Its files are hard links to the step's files (no copy, no extra disk
while the step directory lives; a plain copy where the filesystem has no hard links). Checkpoint
files are never rewritten in place, so pruning the step directory later leaves `best/` intact.
Nothing matches `step_*` here, so `keep_last` never prunes it and `resume=auto` never picks it.

Replacing `best/` is: build `best.partial/`, rename the old `best/` to `best.old/`, rename the new
one in, delete `best.old/`. A crash between the two renames leaves `best.old/`, which
`best_dir()` still finds, so the best so far is never lost.

`latest.json` is written after a save has completed (the step directory renamed into place): to a
temporary file in the same directory, flushed and fsynced, then `os.replace`d over the old pointer
(atomic on POSIX and Windows), then the directory is fsynced. A kill at any point leaves either the
old pointer or the new one, whole; a script that reads it never sees a torn file or a step whose
save did not finish.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

BEST, LATEST, BEST_INFO = "best", "latest.json", "BEST.json"
MODES = ("max", "min")


def better(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` improves on `best` (None: nothing yet). Ties keep the earlier step; NaN never wins."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if value is None or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` to `path` so that a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_latest(root: Path, step: int, checkpoint: Path) -> None:
    write_json_atomic(root / LATEST, {"step": step, "path": str(Path(checkpoint).resolve()), "name": Path(checkpoint).name})


def read_latest(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / LATEST).read_text())
    except (OSError, ValueError):
        return None


def best_dir(root: Path) -> Path | None:
    """The best checkpoint under `root`: best/, or best.old/ when a crash came between the two renames."""
    for name in (BEST, BEST + ".old"):
        if (Path(root) / name / BEST_INFO).is_file():
            return Path(root) / name
    return None


def best_info(root: Path) -> dict | None:
    """BEST.json of the best checkpoint so far ({metric, mode, value, step}), None when there is none."""
    found = best_dir(root)
    try:
        return None if found is None else json.loads((found / BEST_INFO).read_text())
    except (OSError, ValueError):
        return None


def publish_best(root: Path, checkpoint: Path, info: dict) -> Path:
    """Make the complete checkpoint directory `checkpoint` the `best/` one (rank 0 only, after the save)."""
    root = Path(root)
    staging, old, final = root / (BEST + ".partial"), root / (BEST + ".old"), root / BEST
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, copy_function=_link_or_copy)
    write_json_atomic(staging / BEST_INFO, info)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(root)
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (some network and FAT filesystems)
        shutil.copy2(src, dst)


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; os.replace is still atomic
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
