"""`make demo` for several seeds: does GRPO's (or DPO's) gain over SFT hold, and how much does it vary?

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2            # seed 0 is `make demo`'s default
    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1 -- grpo:train.max_steps=100   # demo overrides
    .venv/bin/python benchmarks/demo_seeds.py --pipeline dpo --seeds 0,1,2   # SFT -> DPO (`demo_dpo.py`)
    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2 -- lora=true     # SFT -> QLoRA GRPO (summary-lora.json)

Each seed runs the whole demo (`python -m grpo_fsdp.demo --out=<work>/seed-<S> train.seed=<S>`) from
scratch in its own process, one after another (they would share the cores otherwise), and its
`summary.json` (`summary-dpo.json` with `--pipeline dpo`) gives one row: SFT and GRPO (DPO) held-out greedy
accuracy, the gain with its 95% paired bootstrap interval, and wall-clock seconds (for DPO also how often each
model ranks the held-out pair's chosen solution first, and DPO's implicit-reward accuracy). Below the rows:
median and range (min to max) over seeds.

Writes benchmarks/results/demo_seeds-<date>-<cpu>.md and .json (demo_dpo-... for DPO; the CPU model from
lscpu's "Model name", else platform.processor(), and the core count), so every figure names its machine.
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
    p.add_argument("--pipeline", choices=("grpo", "dpo"), default="grpo", help="what follows SFT (the demo's pipeline=)")
    args = p.parse_args(own)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if any(x.startswith("pipeline=") for x in extra):
        p.error("give the pipeline as --pipeline grpo|dpo, not as a demo override after --")
    return args, extra


def run_seed(seed: int, work: Path, extra: list[str], pipeline: str = "grpo") -> dict:
    """One fresh demo run (its directory is deleted first: the demo resumes finished runs)."""
    out = work / f"seed-{seed}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "grpo_fsdp.demo", f"--out={out}", f"pipeline={pipeline}", f"train.seed={seed}", *extra]
    print(f"demo_seeds: seed {seed}: {' '.join(cmd[1:])}", flush=True)
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False)
    if proc.returncode:
        raise SystemExit(f"demo_seeds: the demo for seed {seed} exited {proc.returncode}; its output is above")
    name = f"summary-{pipeline}.json" if pipeline != "grpo" else "summary-lora.json" if "lora=true" in extra else "summary.json"
    summary = json.loads((out / name).read_text())
    return {**summary, "seed": seed, "process_seconds": time.perf_counter() - began}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def stat_keys(stage: str) -> tuple[str, ...]:
    return ("sft_accuracy", f"{stage}_accuracy", "gain_points", "seconds")


def table(rows: list[dict], stats: dict, stage: str = "grpo") -> str:
    """The Markdown table: a row per seed, then median and range; DPO rows add the held-out pair metrics."""
    pairs = stage == "dpo"
    name = stage.upper()
    extra_head = " chosen first, SFT -> DPO | implicit-reward accuracy |" if pairs else ""
    lines = [f"| seed | SFT | {name} | gain (points) | 95% interval | seconds |{extra_head}",
             "|---|---|---|---|---|---|" + ("---|---|" if pairs else "")]
    for r in rows:
        lo, hi = r["gain_ci95"]
        extra = f" {r['sft_pair_accuracy']:.1%} -> {r['dpo_pair_accuracy']:.1%} | {r['reward_accuracy']:.1%} |" if pairs else ""
        lines.append(f"| {r['seed']} | {r['sft_accuracy']:.1%} | {r[f'{stage}_accuracy']:.1%} | {r['gain_points']:+.1f} "
                     f"| {lo:+.1f} to {hi:+.1f} | {r['seconds']:.0f} |{extra}")
    sft, after, gain, secs = (stats[k] for k in stat_keys(stage))
    blank = " | |" if pairs else ""
    lines.append(f"| median | {sft['median']:.1%} | {after['median']:.1%} | {gain['median']:+.1f} | | {secs['median']:.0f} |{blank}")
    lines.append(f"| range | {sft['min']:.1%} to {sft['max']:.1%} | {after['min']:.1%} to {after['max']:.1%} "
                 f"| {gain['min']:+.1f} to {gain['max']:+.1f} | | {secs['min']:.0f} to {secs['max']:.0f} |{blank}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    cpu, cores = cpu_model(), os.cpu_count()
    now = datetime.now()
    stage = args.pipeline
    rows = [run_seed(seed, args.work, extra, stage) for seed in args.seeds]
    stats = {k: spread([r[k] for r in rows]) for k in stat_keys(stage)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"), "cpu": cpu, "cores": cores,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "python": platform.python_version(), "commit": commit,
            "pipeline": stage, "extra_overrides": extra, "held_out_problems": rows[0]["held_out_problems"]}
    command = f"--pipeline dpo --seeds {','.join(map(str, args.seeds))}" if stage == "dpo" else f"--seeds {','.join(map(str, args.seeds))}"
    text = (f"# `make demo{' ARGS=pipeline=dpo' if stage == 'dpo' else ''}` over seeds ({meta['date']}, {cpu}, {cores} cores)\n\n"
            f"`benchmarks/demo_seeds.py {command}`"
            f"{' -- ' + ' '.join(extra) if extra else ''} at commit {commit or '?'}: held-out greedy accuracy on "
            f"{meta['held_out_problems']} problems; the interval is the paired bootstrap's 95% (grpo_fsdp/bootstrap.py).\n\n"
            f"{table(rows, stats, stage)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{cpu}-{cores}-cores".lower()).strip("-")[:60]
    stem = args.out / f"{'demo_dpo' if stage == 'dpo' else 'demo_seeds'}-{meta['date']}-{slug}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "stats": stats, "runs": rows}, indent=2) + "\n")
    print(f"\n{text}\nwrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
