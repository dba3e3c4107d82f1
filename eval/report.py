"""The results JSON of `python -m eval` and the short table printed at the end.

Layout (one file per invocation):

    {"model", "engine", "date", "device", "dtype", "settings": {every option}, "versions": {...},
     "tasks": {"<task>": {<EvalResult fields>, "num_samples", "source", "model", "engine", "date",
                          "settings": {the generation settings this task ran with}}}}

Each task's entry repeats model, engine and date so that it stands alone when pulled out of the
file. The file is written atomically (temporary file, then rename): a crash never leaves half a JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from eval.evaluate import EvalResult


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "transformers", "math-verify", "vllm"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def task_entry(result: EvalResult, *, model: str, engine: str, date: str, source: str, settings: dict[str, Any],
               max_samples: int = -1) -> dict[str, Any]:
    """One task's block: the result's fields and the context needed to read it on its own."""
    return {**result.to_dict(max_samples), "source": source, "model": model, "engine": engine, "date": date,
            "settings": settings}


def results_document(options: Any, tasks: dict[str, dict[str, Any]], *, date: str, device: str, dtype: str) -> dict[str, Any]:
    """The whole file; `options` is the EvalOptions dataclass."""
    return {"model": options.model, "engine": options.engine, "date": date, "device": device, "dtype": dtype,
            "settings": asdict(options), "versions": _versions(), "tasks": tasks}


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write atomically; parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table(results: list[EvalResult]) -> str:
    """A few lines: one per task, plus its per-level accuracy where the task has levels. `skipped`: problems too
    long for the model's context, counted as wrong in `accuracy` (eval/evaluate.py)."""
    head = f"{'task':<11}{'problems':>9}{'skipped':>8}{'accuracy':>10}{'format':>8}{'length':>8}{'pass@k':>8}{'maj@k':>8}"
    lines = [head + f"{'seconds':>9}"]
    for r in results:
        lines.append(f"{r.task:<11}{r.num_problems:>9}{r.skipped_too_long:>8}{_pct(r.accuracy):>10}{_pct(r.valid_format_rate):>8}"
                     f"{r.mean_length:>8.1f}{_pct(r.pass_at_k):>8}{_pct(r.maj_at_k):>8}{r.seconds:>9.1f}")
        if r.per_level:
            levels = "  ".join(f"L{g} {_pct(row['accuracy'])} ({row['total']})" for g, row in r.per_level.items())
            lines.append(f"{'':<11}{levels}")
    return "\n".join(lines)
