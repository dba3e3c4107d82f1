"""`<run_dir>/metrics.jsonl`: one JSON object per line, `{"step": N, "<namespace>/<name>": value, ...}`.

The rules every logged row follows, checked on every rank before anything is sent or written:
keys are namespaced (`train/`, `rollout/`, `reward/`, `eval/`, `perf/`, `system/`; a bare key is a
programming error and raises), values are plain numbers (0-d tensors and numpy scalars go through
`.item()`). Non-finite floats are written as `null` so the file stays standard JSON (readable by jq
and strict parsers); W&B receives the raw value.

Resume: a run resumed after N completed steps opens the file with `start_step=N`. Lines with
`step > N` came from work the checkpoint does not contain, so they are dropped before appending
(atomically, via a temp file and `os.replace`); a torn last line (a crash mid-write) goes too.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

NAMESPACES = ("train/", "rollout/", "reward/", "eval/", "perf/", "system/", "curriculum/")


def check_key(key: object) -> None:
    if not isinstance(key, str) or not key.startswith(NAMESPACES) or key.endswith("/"):
        raise ValueError(f"metric key {key!r} is not namespaced: prefix it with one of {', '.join(NAMESPACES)}")


def to_number(key: str, value: Any) -> int | float:
    """Plain Python numbers for JSON and W&B; 0-d tensors and numpy scalars go through .item()."""
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metric {key!r} has value {value!r} of type {type(value).__name__}; log numbers only")


def validated(metrics: dict[str, Any], only: str | None = None) -> dict[str, int | float]:
    """Checked keys and plain-number values; `only` restricts the keys to one namespace."""
    values = {}
    for key, value in metrics.items():
        check_key(key)
        if only is not None and not key.startswith(only):
            raise ValueError(f"metric key {key!r} does not belong here: only {only} keys are accepted")
        values[key] = to_number(key, value)
    return values


def _json_safe(value: float) -> int | float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _truncate(path: Path, start_step: int) -> None:
    """Keep only lines with step <= start_step. A torn last line (crash mid-write) is dropped too."""
    if not path.exists():
        return
    kept, changed = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and int(row["step"]) <= start_step
            except (ValueError, KeyError, TypeError):
                keep = False
            changed |= not keep or not line.endswith("\n")
            if keep:
                kept.append(line.rstrip("\n") + "\n")
    if changed:  # rewrite only when needed: the common case then costs a single read
        atomic_write(path, "".join(kept))


class MetricsFile:
    """metrics.jsonl opened for appending after the resume truncation; one line per `write`."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        _truncate(path, start_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- held until close()

    def write(self, step: int, values: dict[str, int | float]) -> None:
        self._file.write(json.dumps({"step": int(step), **{k: _json_safe(v) for k, v in values.items()}}) + "\n")
        self._file.flush()  # a crash loses at most the line being written

    def close(self) -> None:
        self._file.close()
