"""One GRPO step, phase by phase: seconds to generate, score, compute log-probs, train and sync.

The real recipe (`grpo_fsdp.train.main` with `algo=grpo`, in this process, so it works under
torchrun) on random weights built from a config: `model=tiny` with `model.arch.*` set to the real
shapes from conf/model/*.yaml, and the model's real tokenizer (`model.tokenizer`). Lengths are
forced (`algo.ignore_eos=true`): a random-weight model would stop at random, so every completion
runs to --max-new-tokens and every step does the same work. Random weights earn no reward, so
zero-variance groups are kept (`algo.filter_zero_variance=false`) and trained on: their advantages
are 0 but the forward and backward cost the same. The prompts are the built-in arithmetic task.
No evaluation, no checkpoint (`checkpoint.save_final=false`), no W&B.

The recipe logs `perf/<phase>_seconds` every step (on CUDA each phase ends with a synchronize);
this reports their mean over the steps after --warmup, the sum as step time, generation and
training tokens/s, and peak memory (torch's CUDA allocator, NVML, host RSS) from `system/*`.

    .venv/bin/python benchmarks/grpo_step.py                       # tiny model on the CPU
    python benchmarks/grpo_step.py --model qwen2.5-1.5b --tokenizer <qwen2.5 tokenizer dir>
    torchrun --standalone --nproc_per_node=2 benchmarks/grpo_step.py --model qwen2.5-1.5b --tokenizer ...
    python benchmarks/grpo_step.py --model qwen2.5-1.5b -- algo.updates_per_rollout=2   # any override

Writes benchmarks/results/grpo_step-<date>-<machine>.json (appending to its "runs") and one row
to benchmarks/results/grpo_step.md. Only rank 0 prints the summary and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from train_throughput import MODELS, device_name  # benchmarks/ is on sys.path: the script's folder

from grpo_fsdp.cli import CONF_DIR, UserError, compose, group_options, run_main

PHASES = ("generate", "score", "logprobs", "train", "sync")
TABLE_HEAD = ("| date | machine | model | profile | world | prompts x G | new tokens | compile | generate s | score s "
              "| log-probs s | train s | sync s | step s | gen tok/s | train tok/s | peak mem |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--hardware", choices=group_options("hardware"), default="h100x2" if gpu else "cpu")
    p.add_argument("--tokenizer", default="", help="tokenizer directory or hub id (default: the byte-level one "
                   "for tiny, ../shared/tokenizers/qwen2.5 for the Qwen shapes when it exists)")
    p.add_argument("--prompts", type=int, default=16 if gpu else 8, help="prompts per step, over all ranks")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512 if gpu else 64)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward on one rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after the warmup")
    p.add_argument("--warmup", type=int, default=2 if gpu else 1, help="untimed first steps (compilation, allocator)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: the profile's")
    p.add_argument("--engine", choices=("hf", "vllm", "auto"), default="hf", help="rollout engine (default hf)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("overrides", nargs="*", help="more config overrides, after --")
    args = p.parse_args(argv)
    if min(args.prompts, args.group_size, args.max_new_tokens, args.micro_batch, args.steps) < 1 or args.warmup < 0:
        raise UserError("--prompts, --group-size, --max-new-tokens, --micro-batch and --steps must be >= 1, --warmup >= 0")
    if not args.tokenizer and args.model != "tiny" and (REPO.parent / "shared" / "tokenizers" / "qwen2.5").is_dir():
        args.tokenizer = str(REPO.parent / "shared" / "tokenizers" / "qwen2.5")
    return args


def run_dir() -> Path:
    """One directory for all ranks without a collective: torchrun's run id (shared), else this pid."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none":
        if "WORLD_SIZE" in os.environ:
            raise UserError("launch with torchrun --standalone (or --rdzv-id) so the ranks share a run id")
        run_id = str(os.getpid())
    return REPO / "outputs" / "bench" / f"grpo_step-{run_id}"


def overrides(args, out: Path) -> list[str]:
    arch = OmegaConf.load(CONF_DIR / "model" / f"{MODELS[args.model]}.yaml").arch
    rows = args.prompts * args.group_size
    return ["algo=grpo", "model=tiny", f"hardware={args.hardware}", "data=arithmetic",
            *[f"model.arch.{k}={v}" for k, v in arch.items()], *([f"model.tokenizer={args.tokenizer}"] if args.tokenizer else []),
            *([f"hardware.compile={str(args.compile).lower()}"] if args.compile is not None else []),
            f"run_dir={out}", f"rollout.engine={args.engine}", f"train.max_steps={args.warmup + args.steps}",
            f"algo.prompts_per_step={args.prompts}", f"algo.group_size={args.group_size}", f"algo.max_new_tokens={args.max_new_tokens}",
            f"train.global_batch_size={rows}", f"train.micro_batch_size={args.micro_batch}", "algo.ignore_eos=true",
            "algo.filter_zero_variance=false", "checkpoint.save_final=false", "checkpoint.export_hf=false",
            "logging.wandb=false", "logging.progress_bar=false", "eval.tasks=[]", "optim.warmup_steps=0",
            *args.overrides]  # fmt: skip


def summarise(rows: list[dict], warmup: int, max_new_tokens: int) -> dict:
    timed = rows[warmup:]
    mean = lambda key: statistics.fmean(r[key] for r in timed)
    phases = {p: mean(f"perf/{p}_seconds") for p in PHASES if all(f"perf/{p}_seconds" in r for r in timed)}
    peak = lambda suffix: max((v for r in rows for k, v in r.items() if k.startswith("system/") and k.endswith(suffix)), default=None)
    forced = all(r["rollout/completion_length_mean"] == max_new_tokens for r in rows)
    return {"timed_steps": len(timed), "phase_seconds": phases, "step_seconds": sum(phases.values()),
            "step_seconds_each": [sum(r[f"perf/{p}_seconds"] for p in phases) for r in timed],
            "generation_tokens_per_s": mean("perf/generation_tokens_per_s"), "training_tokens_per_s": mean("perf/training_tokens_per_s"),
            "lengths_forced": forced, "cuda_max_allocated_gib": peak("cuda_max_allocated_gib"),
            "gpu_memory_used_gib": peak("gpu_memory_used_gib"), "peak_rss_gib": peak("rss_gib"),
            "gpu_utilization_pct_mean": statistics.fmean(u) if (u := [v for r in timed for k, v in r.items()
                                                                       if k.endswith("gpu_utilization_pct")]) else None}  # fmt: skip


def table_row(meta: dict, args, cfg, s: dict) -> str:
    ph = s["phase_seconds"]
    if s["cuda_max_allocated_gib"]:  # NVML is missing where pynvml or the driver library is
        nvml = "" if s["gpu_memory_used_gib"] is None else f", {s['gpu_memory_used_gib']:.1f} GiB NVML"
        mem = f"{s['cuda_max_allocated_gib']:.1f} GiB alloc{nvml}"
    else:
        mem = f"RSS {s['peak_rss_gib']:.2f} GiB"
    cells = [meta["date"], meta["device"], args.model, cfg.hardware.name, meta["world_size"], f"{args.prompts} x {args.group_size}",
             args.max_new_tokens, cfg.hardware.compile, *(f"{ph.get(p, 0):.2f}" for p in PHASES), f"{s['step_seconds']:.2f}",
             f"{s['generation_tokens_per_s']:,.0f}", f"{s['training_tokens_per_s']:,.0f}", mem]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def write(args, meta: dict, record: dict, row: str) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{meta['world_size']}x-{meta['device']}".lower()).strip("-")[:60]
    path = args.out / f"grpo_step-{meta['date']}-{slug}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    doc["runs"].append(record)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    table = args.out / "grpo_step.md"
    if not table.exists():
        table.write_text("# One GRPO step, time per phase (benchmarks/grpo_step.py)\n\n"
                         "Random weights, forced lengths; means over the timed steps.\n\n" + TABLE_HEAD)
    with table.open("a") as f:
        f.write(row)
    return path


def main(argv: list[str]) -> int:
    from grpo_fsdp.train import main as train

    args = parse_args(argv)
    out = run_dir()
    over = overrides(args, out)
    cfg = compose(over)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0 and out.exists():
        shutil.rmtree(out)  # a reused pid
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--hardware {args.hardware} needs a CUDA device and none is visible; use --hardware cpu")
    code = train(over)
    if code or not rank0:
        return code
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    s = summarise(rows, args.warmup, args.max_new_tokens)
    now = datetime.now()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_name(torch.device(cfg.hardware.device))
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"), "device": device, "world_size": world,
            "torch": torch.__version__, "python": platform.python_version(), "threads_per_rank": torch.get_num_threads()}  # fmt: skip
    launcher = f"torchrun --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}" if "LOCAL_WORLD_SIZE" in os.environ else "python"
    record = {**meta, "command": " ".join([launcher, *sys.argv]), "overrides": over, "model": args.model,
              "profile": cfg.hardware.name, "compile": cfg.hardware.compile, "prompts_per_step": args.prompts,
              "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch,
              "warmup_steps": args.warmup, **s, "steps": rows}  # fmt: skip
    row = table_row(meta, args, cfg, s)
    print(f"\ngrpo_step: {args.model} on {device}, world {world}, {args.prompts} prompts x G={args.group_size}, "
          f"{args.max_new_tokens} new tokens (forced: {s['lengths_forced']}), mean of {s['timed_steps']} steps after {args.warmup}")
    for p, sec in s["phase_seconds"].items():
        print(f"  {p:<9} {sec:8.3f} s  {sec / s['step_seconds']:6.1%}")
    print(f"  {'step':<9} {s['step_seconds']:8.3f} s   generation {s['generation_tokens_per_s']:,.0f} tok/s, "
          f"training {s['training_tokens_per_s']:,.0f} tok/s\n\n{TABLE_HEAD}{row}")
    if not s["lengths_forced"]:
        print("warning: some completions were shorter than --max-new-tokens; forced lengths did not hold", file=sys.stderr)
    print(f"wrote {write(args, meta, record, row)} and {args.out / 'grpo_step.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
