"""The demo end to end in a short version (tiny model, a few steps, 8 held-out problems), its
command line, and the multi-seed table of benchmarks/demo_seeds.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _env

from grpo_fsdp.cli import UserError
from grpo_fsdp.demo import OUT, split_args

SHORT = [
    "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_layers=2",
    "data.arithmetic.num_test=8", "optim.warmup_steps=1", "logging.progress_bar=false",
    "sft:train.max_steps=4", "sft:train.global_batch_size=8", "sft:train.micro_batch_size=4",
    "grpo:train.max_steps=2", "grpo:algo.prompts_per_step=2", "grpo:algo.group_size=4", "grpo:algo.max_new_tokens=16",
    "grpo:train.global_batch_size=8", "grpo:train.micro_batch_size=8",
]
FIELDS = {"seed", "sft_accuracy", "grpo_accuracy", "gain_points", "gain_ci95", "held_out_problems", "sft_mean_length",
          "grpo_mean_length", "sft_seconds", "grpo_seconds", "eval_seconds", "seconds"}


def test_short_demo_writes_every_summary_field(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.demo", f"--out={out}", "train.seed=3", *SHORT], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == FIELDS
    assert summary["seed"] == 3 and summary["held_out_problems"] == 8
    assert summary["gain_points"] == 100 * (summary["grpo_accuracy"] - summary["sft_accuracy"])
    for key in ("sft_accuracy", "grpo_accuracy"):
        assert summary[key] * 8 == pytest.approx(round(summary[key] * 8), abs=1e-12)  # k of 8 problems
    lo, hi = summary["gain_ci95"]
    assert -100 <= lo <= summary["gain_points"] <= hi <= 100
    for end in (lo, hi):  # a resample's gain is a whole number of problems out of 8
        assert end / 12.5 == pytest.approx(round(end / 12.5), abs=1e-9)
    assert 0 < summary["sft_seconds"] + summary["grpo_seconds"] + summary["eval_seconds"] <= summary["seconds"] + 1e-6
    assert (out / "sft" / "hf").is_dir() and (out / "grpo" / "hf").is_dir()
    assert "95% interval" in proc.stdout and str(out / "summary.json") in proc.stdout


def test_arguments_split_by_stage():
    out, both, sft, grpo = split_args(["--out=/tmp/x", "train.seed=1", "sft:train.max_steps=3", "grpo:algo.group_size=4"])
    assert (out, both, sft, grpo) == (Path("/tmp/x"), ["train.seed=1"], ["train.max_steps=3"], ["algo.group_size=4"])
    assert split_args([])[0] == OUT
    with pytest.raises(UserError, match="unknown option '--outdir=x'"):
        split_args(["--outdir=x"])


def _demo_seeds():
    spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_seeds_table_median_and_range():
    ds = _demo_seeds()
    rows = [{"seed": s, "sft_accuracy": a, "grpo_accuracy": b, "gain_points": 100 * (b - a), "gain_ci95": [lo, hi], "seconds": t}
            for s, a, b, lo, hi, t in [(0, 0.25, 0.5, 18.0, 32.0, 300.0), (1, 0.3, 0.4, 4.0, 16.0, 280.0),
                                       (2, 0.2, 0.35, 9.0, 21.0, 310.0)]]
    stats = {k: ds.spread([r[k] for r in rows]) for k in ("sft_accuracy", "grpo_accuracy", "gain_points", "seconds")}
    assert stats["gain_points"] == {"median": pytest.approx(15.0), "min": pytest.approx(10.0), "max": pytest.approx(25.0)}
    text = ds.table(rows, stats)
    assert "| 0 | 25.0% | 50.0% | +25.0 | +18.0 to +32.0 | 300 |" in text
    assert "| median | 25.0% | 40.0% | +15.0 | | 300 |" in text
    assert "| range | 20.0% to 30.0% | 35.0% to 50.0% | +10.0 to +25.0 | | 280 to 310 |" in text


def test_demo_seeds_cpu_model_is_named():
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout if Path("/usr/bin/lscpu").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    got = _demo_seeds().cpu_model()
    assert got and (got == name if name else True)
