"""Peak memory of one GRPO step: full fine-tune vs LoRA vs QLoRA, with the memory plan's prediction beside each.

Issue 14's memory benchmark. Each variant is the real GRPO recipe (`grpo_fsdp.train.main`, `algo=grpo`,
`train.max_steps=1`) in its own process, on random weights built from a config (`model=tiny` with the
real shapes of conf/model/<model>.yaml, as in grpo_step.py) and the model's real tokenizer (`--tokenizer`). The settings are the 8 GB preset's
(`experiment=deepseek-r1-distill-1.5b-gpu8gb`: G = 8, one prompt's G completions per micro-batch,
activation checkpointing, no KL, LoRA r16/alpha 32 on q,k,v,o, NF4 base) with the data swapped for the
built-in arithmetic prompts and shorter lengths by flag (`--prompt-len`, `--max-new-tokens`; lengths
are forced with `algo.ignore_eos=true`, so every completion is `--max-new-tokens` long). On CUDA the
profile is `gpu8gb` (bf16, CPU offload of the sharded state); on the CPU it is `cpu` (fp32) with the
preset's settings. The training attention is `hardware.grpo_attention=sdpa` (no compilation to wait for),
the rollout engine the transformers one. Without a Qwen2.5 tokenizer (--tokenizer, $GPU_CHECK_TOKENIZER,
../shared/tokenizers/qwen2.5) the prompts use the byte-level one; the model keeps Qwen2.5's vocabulary.

    variant   overrides on top of the preset's settings
    full      hardware.lora.enabled=false hardware.load_in_4bit=false
    lora      hardware.lora.enabled=true  hardware.load_in_4bit=false
    qlora     hardware.lora.enabled=true  hardware.load_in_4bit=true

Measured peak: on CUDA `torch.cuda.max_memory_allocated()` over the whole run (what the plan predicts,
less its CUDA-context line); on the CPU the process's high-water RSS (VmHWM, reset after the imports)
minus its RSS after the imports (the plan's total for a CPU device, world size 1, host runtime included). Step seconds: the recipe's `perf/*_seconds` of the
step (generate, score, log-probs, train, sync). Plan: `grpo_fsdp.estimate.estimate_memory` of the same
config. A variant whose plan does not fit this machine's memory (full fine-tune of 1.5B on a 24 GB CPU)
is recorded as not run, with the plan's number. On CUDA the variants run side by side (`--jobs`, default all:
peaks are per process, so this changes the step seconds, not the memory; `--jobs 1` for clean timings).

    .venv/bin/python benchmarks/qlora_memory.py --model qwen2.5-1.5b --device cpu --variants qlora,lora --max-new-tokens 8
    python benchmarks/qlora_memory.py --model qwen2.5-1.5b --device cuda --out benchmarks/results/gpu

Writes <out>/qlora_memory-<date>-<machine>.json and appends one row per variant to <out>/qlora_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
MODELS = {"tiny": "tiny", "qwen2.5-1.5b": "qwen2.5-1.5b"}
VARIANTS = {
    "full": ["hardware.lora.enabled=false", "hardware.load_in_4bit=false"],
    "lora": ["hardware.lora.enabled=true", "hardware.load_in_4bit=false"],
    "qlora": ["hardware.lora.enabled=true", "hardware.load_in_4bit=true"],
}
PRESET = "deepseek-r1-distill-1.5b-gpu8gb"
PHASES = ("generate", "score", "logprobs", "train", "sync")
GIB = 1024**3
TABLE_HEAD = ("| date | machine | model | variant | G x new tokens | measured peak | plan | plan / measured | step s "
              "| trainable |\n|---|---|---|---|---|---|---|---|---|---|\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="qwen2.5-1.5b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default for the Qwen shapes: $GPU_CHECK_TOKENIZER, "
                   "../shared/tokenizers/qwen2.5 beside the repo or shared/tokenizers/qwen2.5 inside it, else byte-level)")
    p.add_argument("--variants", default="full,lora,qlora", help="comma-separated: full, lora, qlora")
    p.add_argument("--group-size", type=int, default=8, help="G (the preset's 8)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step (one micro-batch of G completions each)")
    p.add_argument("--prompt-len", type=int, default=64, help="data.max_prompt_length (arithmetic prompts are shorter)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="forced completion length")
    p.add_argument("--jobs", type=int, default=0, help="variants run side by side (default: all on CUDA, 1 on the CPU)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one variant here, JSON to this file
    p.add_argument("overrides", nargs="*", help="more config overrides, after --")
    a = p.parse_args(argv)
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad or min(a.group_size, a.prompts, a.prompt_len, a.max_new_tokens) < 1 or a.group_size < 2:
        p.error(f"unknown variants {bad}" if bad else "--group-size >= 2, --prompts/--prompt-len/--max-new-tokens >= 1")
    if not a.tokenizer and a.model != "tiny":  # the byte-level one when none is found: random weights either way
        env = os.environ.get("GPU_CHECK_TOKENIZER", "")
        found = [d for d in (Path(env) if env else None, REPO.parent / "shared" / "tokenizers" / "qwen2.5",
                             REPO / "shared" / "tokenizers" / "qwen2.5") if d is not None and d.is_dir()]
        a.tokenizer = str(found[0]) if found else ""
        if not found and not a.child:
            print("note: no Qwen2.5 tokenizer found (--tokenizer, GPU_CHECK_TOKENIZER, ../shared/tokenizers/qwen2.5): "
                  "prompts use the byte-level tokenizer, the model keeps Qwen2.5's vocabulary", file=sys.stderr)
    return a


def overrides(a: argparse.Namespace, variant: str, run_dir: str) -> list[str]:
    """The config of one variant: the 8 GB preset's settings on this device, random weights, short lengths."""
    from omegaconf import OmegaConf

    from grpo_fsdp.cli import CONF_DIR

    arch = OmegaConf.load(CONF_DIR / "model" / f"{MODELS[a.model]}.yaml").arch
    hardware = "gpu8gb" if a.device == "cuda" else "cpu"
    rows = a.prompts * a.group_size
    return [f"experiment={PRESET}", f"hardware={hardware}", "model=tiny", "model.path=", "data=arithmetic",
            *[f"model.arch.{k}={v}" for k, v in arch.items()], *([f"model.tokenizer={a.tokenizer}"] if a.tokenizer else []),
            "hardware.activation_checkpointing=true", "hardware.grpo_attention=sdpa", "hardware.lora.rank=16", "hardware.lora.alpha=32",
            "hardware.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", *VARIANTS[variant],
            f"data.max_prompt_length={a.prompt_len}", f"data.max_length={a.prompt_len + a.max_new_tokens}",
            f"algo.prompts_per_step={a.prompts}", f"algo.group_size={a.group_size}", f"algo.max_new_tokens={a.max_new_tokens}",
            f"train.global_batch_size={rows}", f"train.micro_batch_size={a.group_size}", "train.max_steps=1",
            "algo.ignore_eos=true", "algo.filter_zero_variance=false", "rollout.engine=hf", "rollout.probe_prompts=0",
            "checkpoint.save_final=false", "checkpoint.export_hf=false", "logging.wandb=false", "logging.progress_bar=false",
            "data.instruction=", "eval.tasks=[]", "optim.warmup_steps=0", f"run_dir={run_dir}", *a.overrides]  # fmt: skip


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (high-water mark) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(a: argparse.Namespace, variant: str, result: Path) -> int:
    """One variant in this process: imports, baseline, the recipe's one step, peaks."""
    import torch

    import grpo_fsdp.recipes.grpo  # noqa: F401  (every import the step needs, before the baseline)
    from grpo_fsdp.cli import compose
    from grpo_fsdp.estimate import estimate_memory
    from grpo_fsdp.train import main as train

    with tempfile.TemporaryDirectory() as tmp:
        over = overrides(a, variant, f"{tmp}/run")
        cfg = compose(over)
        est = estimate_memory(cfg, 1)
        if Path("/proc/self/clear_refs").exists():  # Linux: "5" resets VmHWM, the peak is the step's own
            Path("/proc/self/clear_refs").write_text("5")
        base = status_bytes("VmRSS")
        tick = time.perf_counter()
        code = train(over)
        wall = time.perf_counter() - tick
        peak_rss = status_bytes("VmHWM")
        rows = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines() if x.strip()] if code == 0 else []
    cuda = a.device == "cuda"
    step = {p: rows[0].get(f"perf/{p}_seconds", 0.0) for p in PHASES} if rows else {}
    out = {"variant": variant, "exit_code": code, "overrides": over, "wall_seconds": wall,
           "measured_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss - base,
           "measure": "torch.cuda.max_memory_allocated" if cuda else "VmHWM - VmRSS after imports",
           "rss_after_imports_bytes": base, "peak_rss_bytes": peak_rss, "step_seconds": sum(step.values()),
           "phase_seconds": step, "plan": plan_record(est, cuda)}  # fmt: skip
    result.write_text(json.dumps(out))
    return code


def plan_record(est, cuda: bool) -> dict:
    """The plan's numbers; on CUDA the comparison leaves out its CUDA-context line (not in the allocator's count)."""
    record = {k: v for k, v in vars(est).items() if isinstance(v, int | float)}
    record["compare_bytes"] = est.total - est.cuda_context if cuda else est.host_total
    return record


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    return f"{name} ({os.cpu_count()} cores)"


def fits_here(a: argparse.Namespace, variant: str) -> tuple[bool, dict]:
    """The plan of a variant and whether it fits this machine (host RAM on CPU; the GPU's memory on CUDA)."""
    import torch

    from grpo_fsdp.cli import compose
    from grpo_fsdp.estimate import estimate_memory

    est = estimate_memory(compose(overrides(a, variant, "/tmp/unused")), 1)
    record = plan_record(est, a.device == "cuda")
    if a.device == "cuda":
        return est.total <= torch.cuda.get_device_properties(0).total_memory, record
    import psutil

    return est.total <= 0.9 * psutil.virtual_memory().available, record


def row(meta: dict, a: argparse.Namespace, r: dict) -> str:
    plan = r["plan"]["compare_bytes"]
    if "measured_bytes" not in r:
        cells = [meta["date"], meta["machine"], a.model, r["variant"], f"{a.group_size} x {a.max_new_tokens}",
                 f"not run: {r['reason']}", f"{plan / GIB:.2f} GiB", "", "", f"{r['plan']['trainable_params'] / 1e6:.1f} M"]
    else:
        m = r["measured_bytes"]
        cells = [meta["date"], meta["machine"], a.model, r["variant"], f"{a.group_size} x {a.max_new_tokens}",
                 f"{m / GIB:.2f} GiB", f"{plan / GIB:.2f} GiB", f"{plan / max(m, 1):.2f}", f"{r['step_seconds']:.1f}",
                 f"{r['plan']['trainable_params'] / 1e6:.1f} M"]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def run_variants(a: argparse.Namespace, variants: list[str], jobs: int, tmp: Path) -> list[dict]:
    """Each variant in its own process, `jobs` at a time (peaks are per process, so running them side by side on
    one GPU changes the step seconds, not the memory); a variant whose plan does not fit is not run."""
    results: dict[str, dict] = {}
    pending = []
    for v in variants:
        ok, plan = fits_here(a, v)
        if not ok:
            results[v] = {"variant": v, "reason": "the plan does not fit this machine", "plan": plan}
            print(f"{v}: not run, the plan ({plan['compare_bytes'] / GIB:.2f} GiB) does not fit this machine", flush=True)
        else:
            pending.append((v, plan))
    running: list[tuple[str, dict, Path, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            v, plan = pending.pop(0)
            out = tmp / f"{v}.json"
            argv_child = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--variants", v,
                          "--model", a.model, "--device", a.device, "--group-size", str(a.group_size), "--prompts",
                          str(a.prompts), "--prompt-len", str(a.prompt_len), "--max-new-tokens", str(a.max_new_tokens),
                          *(["--tokenizer", a.tokenizer] if a.tokenizer else []), "--", *a.overrides]  # fmt: skip
            running.append((v, plan, out, subprocess.Popen(argv_child, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                           text=True)))
        v, plan, out, proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode or not out.exists():
            tail = (err.strip().splitlines() or ["no output"])[-1]
            results[v] = {"variant": v, "reason": f"exit {proc.returncode}: {tail[:160]}", "plan": plan}
            print(f"{v}: failed (exit {proc.returncode})\n{err[-3000:]}", file=sys.stderr, flush=True)
            continue
        r = results[v] = json.loads(out.read_text())
        print(f"{v}: measured {r['measured_bytes'] / GIB:.3f} GiB ({r['measure']}), plan {r['plan']['compare_bytes'] / GIB:.3f} "
              f"GiB, step {r['step_seconds']:.1f} s", flush=True)
    return [results[v] for v in variants]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return run_child(a, a.variants, Path(a.child))
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
            return 2
    now = datetime.now()
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"), "machine": machine(a.device),
            "python": platform.python_version(), "command": " ".join([sys.executable, *sys.argv])}
    variants = a.variants.split(",")
    jobs = a.jobs or (len(variants) if a.device == "cuda" else 1)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_variants(a, variants, jobs, Path(tmp))
    meta["concurrent_variants"] = jobs
    a.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{a.device}-{meta['machine']}".lower()).strip("-")[:60]
    path = a.out / f"qlora_memory-{meta['date']}-{slug}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    doc["runs"].append({**meta, "args": {k: str(v) for k, v in vars(a).items()}, "variants": results})
    path.write_text(json.dumps(doc, indent=2) + "\n")
    table = a.out / "qlora_memory.md"
    if not table.exists():
        table.write_text("# One GRPO step: full vs LoRA vs QLoRA peak memory (benchmarks/qlora_memory.py)\n\n"
                         "Measured: CUDA max allocated (GPU) or VmHWM above the RSS after imports (CPU). Plan: "
                         "grpo_fsdp.estimate (less its CUDA-context line on GPU).\n\n" + TABLE_HEAD)
    rows = "".join(row(meta, a, r) for r in results)
    with table.open("a") as f:
        f.write(rows)
    print(f"\n{TABLE_HEAD}{rows}\nwrote {path} and {table}")
    return 0 if all("measured_bytes" in r or "does not fit" in r.get("reason", "") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
