"""The curriculum cache: one JSONL file per (model, data, samples M, seed), resumable, and its use in training.

    {"version": 1, "key": {"model": ..., "data": ..., "samples": 8, "seed": 0}}     first line
    {"id": "3f2a...", "entropy": 0.5623, "clusters": [3, 1], "no_answer": 0}        one line per prompt

`id` is a hash of the question text, so the file does not depend on the data's row order, on
`data.limit` or on which prompts a run drops as too long. `key.model` names the model and, for a
local directory, the size and modification time of its config and weight files, so retraining a
checkpoint into the same directory invalidates the cache too. Rows are appended and flushed as
prompts finish: an interrupted run keeps them and the next run with the same key skips them. A file
whose key differs is moved aside to `<file>.stale` and computed afresh (the tool), or refused in one
line (training).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from grpo_fsdp.cli import UserError

VERSION = 1
_WEIGHTS = (".safetensors", ".bin", ".pt", ".json")


def prompt_id(question: str) -> str:
    return hashlib.sha256(question.encode()).hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    """The model's path, plus (name, size, mtime) of its config and weight files when it is a local directory."""
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        return path
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHTS)
    stamp = hashlib.sha256(json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    return f"{p.resolve()}@{stamp.hexdigest()[:12]}"


def model_key(model_cfg, seed: int) -> str:
    """The model part of the key: its fingerprint, or the tiny model's name and init seed (model.path empty)."""
    if model_cfg.path:
        return model_fingerprint(model_cfg.path)
    arch = hashlib.sha256(json.dumps(dataclasses.asdict(model_cfg.arch), sort_keys=True).encode()).hexdigest()[:8]
    return f"{model_cfg.name}(random init, seed {seed}, arch {arch})"


def data_fingerprint(name: str, questions: Sequence[str]) -> str:
    return f"{name}@{hashlib.sha256(''.join(prompt_id(q) for q in questions).encode()).hexdigest()[:12]}"


def make_key(model: str, data: str, samples: int, seed: int) -> dict:
    return {"model": model, "data": data, "samples": samples, "seed": seed}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def read(path: Path) -> tuple[dict | None, dict[str, dict]]:
    """(key, rows by id) of a cache file; (None, {}) when absent. A torn last line (a kill mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return None, {}
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0])
    except (IndexError, ValueError):
        return None, {}
    rows = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    return head.get("key"), rows


class Writer:
    """Appends rows to the cache for `key`, keeping the rows already there when the key matches."""

    def __init__(self, path: Path, key: dict):
        self.path = Path(path)
        found, self.rows = read(self.path)
        self.stale = found is not None and found != key
        if found != key:
            if self.path.exists():
                os.replace(self.path, self.path.with_name(self.path.name + ".stale"))
            self.rows = {}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"version": VERSION, "key": key}) + "\n")
        elif self.path.read_text()[-1:] != "\n":  # a torn last line: start the next row on a line of its own
            with open(self.path, "a") as f:
                f.write("\n")

    def add(self, rows: Iterable[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                self.rows[row["id"]] = row
            f.flush()
            os.fsync(f.fileno())


def training_order(path: str, questions: Sequence[str], model: str | None, drop_solved: bool) -> tuple[list[int], list[float], str]:
    """(positions easiest first, entropy per position, a report line) for the training prompts `questions`.

    Ties keep the data order. With `drop_solved`, prompts whose samples all agree (H = 0: all right or all
    wrong, so every group has zero advantage) leave the ordering. `model` (a fingerprint) is checked
    against the file's key when given."""
    key, rows = read(Path(path))
    if key is None:
        raise UserError(f"data.curriculum_file={path} is missing or unreadable; compute it with "
                        "python -m grpo_fsdp.curriculum model=... data=... samples=8 out=<file>")
    if model is not None and key.get("model") != model:
        raise UserError(f"data.curriculum_file={path} was computed for model {key.get('model')}, not {model}; "
                        "recompute it with python -m grpo_fsdp.curriculum for this model")
    entropies = []
    for q in questions:
        row = rows.get(prompt_id(q))
        if row is None:
            raise UserError(f"data.curriculum_file={path} has no entropy for {sum(prompt_id(x) not in rows for x in questions)} "
                            f"of the {len(questions)} training prompts (e.g. {q[:60]!r}); recompute it for this data")
        entropies.append(float(row["entropy"]))
    solved = [i for i, h in enumerate(entropies) if h == 0.0]
    keep = [i for i in range(len(questions)) if not (drop_solved and entropies[i] == 0.0)]
    order = sorted(keep, key=lambda i: (entropies[i], i))
    line = (f"curriculum: {len(questions)} prompts by semantic entropy from {path}; {len(solved)} with H = 0 "
            f"(every sample gives the same answer: no GRPO signal) {'dropped' if drop_solved else 'kept'}")
    return order, entropies, line
