"""`make demo` for several seeds: does GRPO's gain over SFT hold, and how much does it vary?

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2            # seed 0 is `make demo`'s default
    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1 -- grpo:train.max_steps=100   # demo overrides

Each seed runs the whole demo (`python -m grpo_fsdp.demo --out=<work>/seed-<S> train.seed=<S>`) from
scratch in its own process, one after another (they would share the cores otherwise), and its
`summary.json` gives one row: SFT and GRPO held-out greedy accuracy, the gain with its 95% paired
bootstrap interval, and wall-clock seconds. Below the rows: median and range (min to max) over seeds.

Writes benchmarks/results/demo_seeds-<date>-<cpu>.md and .json (the CPU model from lscpu's "Model
name", else platform.processor(), and the core count), so every figure names its machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """lscpu's "Model name" (e.g. "AMD EPYC"), else platform.processor(), else "cpu"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    return name or platform.processor() or "cpu"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default 0,1,2)")
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "demo_seeds", help="run directories (seed-<S> below it)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the results files go")
    args = p.parse_args(own)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    return args, extra


def run_seed(seed: int, work: Path, extra: list[str]) -> dict:
    """One fresh demo run (its directory is deleted first: the demo resumes finished runs)."""
    out = work / f"seed-{seed}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "grpo_fsdp.demo", f"--out={out}", f"train.seed={seed}", *extra]
    print(f"demo_seeds: seed {seed}: {' '.join(cmd[1:])}", flush=True)
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False)
    if proc.returncode:
        raise SystemExit(f"demo_seeds: the demo for seed {seed} exited {proc.returncode}; its output is above")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "seed": seed, "process_seconds": time.perf_counter() - began}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(rows: list[dict], stats: dict) -> str:
    lines = ["| seed | SFT | GRPO | gain (points) | 95% interval | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["gain_ci95"]
        lines.append(f"| {r['seed']} | {r['sft_accuracy']:.1%} | {r['grpo_accuracy']:.1%} | {r['gain_points']:+.1f} "
                     f"| {lo:+.1f} to {hi:+.1f} | {r['seconds']:.0f} |")
    s = {k: stats[k] for k in ("sft_accuracy", "grpo_accuracy", "gain_points", "seconds")}
    lines.append(f"| median | {s['sft_accuracy']['median']:.1%} | {s['grpo_accuracy']['median']:.1%} "
                 f"| {s['gain_points']['median']:+.1f} | | {s['seconds']['median']:.0f} |")
    lines.append(f"| range | {s['sft_accuracy']['min']:.1%} to {s['sft_accuracy']['max']:.1%} "
                 f"| {s['grpo_accuracy']['min']:.1%} to {s['grpo_accuracy']['max']:.1%} "
                 f"| {s['gain_points']['min']:+.1f} to {s['gain_points']['max']:+.1f} | "
                 f"| {s['seconds']['min']:.0f} to {s['seconds']['max']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    cpu, cores = cpu_model(), os.cpu_count()
    now = datetime.now()
    rows = [run_seed(seed, args.work, extra) for seed in args.seeds]
    stats = {k: spread([r[k] for r in rows]) for k in ("sft_accuracy", "grpo_accuracy", "gain_points", "seconds")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"), "cpu": cpu, "cores": cores,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "python": platform.python_version(), "commit": commit,
            "extra_overrides": extra, "held_out_problems": rows[0]["held_out_problems"]}
    text = (f"# `make demo` over seeds ({meta['date']}, {cpu}, {cores} cores)\n\n"
            f"`benchmarks/demo_seeds.py --seeds {','.join(map(str, args.seeds))}`"
            f"{' -- ' + ' '.join(extra) if extra else ''} at commit {commit or '?'}: held-out greedy accuracy on "
            f"{meta['held_out_problems']} problems; the interval is the paired bootstrap's 95% (grpo_fsdp/bootstrap.py).\n\n"
            f"{table(rows, stats)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{cpu}-{cores}-cores".lower()).strip("-")[:60]
    stem = args.out / f"demo_seeds-{meta['date']}-{slug}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "stats": stats, "runs": rows}, indent=2) + "\n")
    print(f"\n{text}\nwrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
