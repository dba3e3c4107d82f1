"""GRPO training attention kernels side by side: one step's micro-batches, forward + backward, seconds and peak memory.

The kernels of `hardware.grpo_attention` (grpo_fsdp/grpo_attention.py) on the same micro-batches, each in
its own process (so peak memory is its own):

    sdpa        the shared-prefix layout through SDPA with explicit masks (the default before issue 17)
    flex        the shared-prefix layout through FlexAttention with a block mask (flex_prefix.py)
    fa2_varlen  padding-free rows through FlashAttention-2's varlen kernel (CUDA with flash-attn only)
    padded      prompt + completion rows, right-padded, plain SDPA (algo.shared_prefix=false)

What is timed: `Policy` (the trainer's own module, random weights from a config's shapes, no FSDP)
scoring every completion of one GRPO step (--prompts x --group), --micro-batch completions at a time,
each micro-batch's loss sum(log p * advantage) backpropagated; no optimizer step. --no-grad times the
scoring pass instead (old / reference log-probs). Completion lengths are drawn uniformly from
[(1 - --spread) x --completion-len, --completion-len] (seeded, the same for every kernel); prompts are
--prompt-len tokens. Token ids are random: they do not change the cost.

Peak memory: on CUDA the allocator's peak over the timed steps minus what was allocated before them;
on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the warm-up, so
compilation is not billed) minus its RSS before the timed steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prefix_attention.py --repeats 2     # CPU: tiny shapes
    python benchmarks/prefix_attention.py --model qwen2.5-1.5b --device cuda --prompt-len 256 --completion-len 1024

Writes benchmarks/results/prefix_attention-<date>-<device>.json and appends rows to prefix_attention.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
KERNELS = ("sdpa", "flex", "fa2_varlen", "padded")
MODELS = {"tiny": "tiny", "qwen2.5-1.5b": "qwen2.5-1.5b", "qwen2.5-7b": "deepseek-r1-distill-qwen-7b"}
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="shapes from conf/model/*.yaml, random weights")
    p.add_argument("--arch", default="", help="shape overrides, e.g. hidden_size=512,num_layers=4 (model.arch fields)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--kernels", default=None, help="comma list of " + ", ".join(KERNELS) + " (default: all that run here)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="G completions per prompt")
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--completion-len", type=int, default=64, help="longest completion")
    p.add_argument("--spread", type=float, default=0.5, help="completion lengths uniform in [(1-spread) x len, len]")
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation, allocator)")
    p.add_argument("--no-grad", action="store_true", help="time the scoring pass (no backward) instead")
    p.add_argument("--repeats", type=int, default=1, help="processes per kernel, kernels alternating; the fastest is kept")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--kernel", default=None, help=argparse.SUPPRESS)  # internal: run one kernel in this process
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def lengths(a) -> list[int]:
    import random

    rng = random.Random(0)
    low = max(1, round(a.completion_len * (1 - a.spread)))
    return [rng.randint(low, a.completion_len) for _ in range(a.prompts * a.group)]


def rss(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


# ---------------------------------------------------------------------------------------------
# one kernel, in a child process
# ---------------------------------------------------------------------------------------------
def run_kernel(a) -> dict:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_fsdp.attention import with_our_attention
    from grpo_fsdp.cli import CONF_DIR
    from grpo_fsdp.config import ArchConfig
    from grpo_fsdp.data.sft import SFTSample, collate
    from grpo_fsdp.policy import Policy
    from grpo_fsdp.shared_prefix import pack

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    arch = OmegaConf.merge(OmegaConf.structured(ArchConfig), OmegaConf.load(CONF_DIR / "model" / f"{MODELS[a.model]}.yaml").arch,
                           OmegaConf.from_dotlist(a.arch.split(",") if a.arch else []))
    vocab = arch.vocab_size or 512
    conf = Qwen2Config(vocab_size=vocab, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                       num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                       num_key_value_heads=arch.num_kv_heads, max_position_embeddings=a.prompt_len + a.completion_len + 8,
                       tie_word_embeddings=arch.tie_embeddings, rope_theta=arch.rope_theta, pad_token_id=0,
                       bos_token_id=None, eos_token_id=1)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(with_our_attention(conf) if a.kernel != "padded" else conf, dtype=dtype)
    policy = Policy(hf, chunk_size=1024, grpo_attention="sdpa" if a.kernel == "padded" else a.kernel).train()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (a.prompt_len,), generator=gen).tolist() for _ in range(a.prompts)]
    comps = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths(a)]
    micro = []
    for lo in range(0, len(comps), a.micro_batch):
        idx = range(lo, min(lo + a.micro_batch, len(comps)))
        runs = list(dict.fromkeys(i // a.group for i in idx))
        if a.kernel == "padded":
            b = collate([SFTSample(prompts[i // a.group] + comps[i], [False] * a.prompt_len + [True] * len(comps[i]))
                         for i in idx], 0)
            mask = b.pop("loss_mask")[:, 1:]
            micro.append(({k: v.to(dev) for k, v in b.items()}, mask.to(dev)))
        else:
            sp = pack([prompts[r] for r in runs], [comps[i] for i in idx], [runs.index(i // a.group) for i in idx], 0)
            micro.append(({"shared_prefix": sp.to(dev)}, sp.completion_mask().to(dev)))

    def step():
        for inputs, mask in micro:
            with torch.set_grad_enabled(not a.no_grad):
                logp, _ = policy(**inputs, target_mask=mask)
                if not a.no_grad:
                    logp.sum().backward()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    policy.zero_grad(set_to_none=False)  # gradients stay allocated: every kernel holds the same ones
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        before = rss("VmRSS")
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")
    tokens = sum(a.prompt_len for _ in comps) + sum(map(len, comps))
    return {"kernel": a.kernel, "seconds_mean": statistics.mean(times), "seconds_min": min(times),
            "extra_peak_gib": (peak - before) / GIB, "tokens_per_s": tokens / statistics.mean(times)}


# ---------------------------------------------------------------------------------------------
# parent: one child per kernel, then the tables
# ---------------------------------------------------------------------------------------------
def runnable(kernel: str, device: str) -> str | None:
    """Why `kernel` cannot run on `device` here, or None."""
    from grpo_fsdp.grpo_attention import unavailable

    return unavailable(kernel, device.split(":")[0]) if kernel != "padded" else None


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "cpu")
    return f"{cpu} ({os.cpu_count()} cores, {os.environ.get('OMP_NUM_THREADS', 'all')} threads)"


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.kernel:
        a.result.write_text(json.dumps(run_kernel(a)))
        return 0
    kernels = a.kernels.split(",") if a.kernels else [k for k in KERNELS if not runnable(k, a.device)]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        print(f"error: --kernels: unknown {unknown}; choose from {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    shape = (f"{a.model}{' ' + a.arch if a.arch else ''} {a.device} {a.dtype or 'default dtype'}: {a.prompts} prompts x G={a.group}, prompt {a.prompt_len}, "
             f"completions {lengths(a) and min(lengths(a))}-{a.completion_len}, micro-batch {a.micro_batch}, "
             f"{'no-grad scoring' if a.no_grad else 'forward + backward'}")
    print(shape, flush=True)
    load_start = os.getloadavg()[0]  # other processes on a shared machine: numbers under load are not comparable
    runs: dict[str, list[dict]] = {k: [] for k in kernels}
    skipped: dict[str, str] = {}
    for rep in range(a.repeats):
        for k in kernels if rep % 2 == 0 else kernels[::-1]:
            why = skipped.get(k) or runnable(k, a.device)
            if why:
                skipped[k] = why
                continue
            result = a.out / f".prefix_attention-{k}.json"
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--kernel", k, "--result", str(result)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                errors = [ln for ln in proc.stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
                skipped[k] = "failed: " + (errors or proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
                continue
            runs[k].append(json.loads(result.read_text()))
            result.unlink()
            r = runs[k][-1]
            print(f"{k:>11}: {r['seconds_mean']:.3f} s/step (min {r['seconds_min']:.3f}), extra peak "
                  f"{r['extra_peak_gib'] * 1024:,.0f} MiB, {r['tokens_per_s']:,.0f} tok/s", flush=True)
    rows = []
    for k in kernels:
        if k in skipped:
            rows.append({"kernel": k, "not_run": skipped[k]})
            print(f"{k:>11}: not run ({skipped[k]})", flush=True)
            continue
        best = min(runs[k], key=lambda r: r["seconds_mean"])  # other processes' load only ever slows a run down
        rows.append({**best, "repeats": [r["seconds_mean"] for r in runs[k]],
                     "extra_peak_gib": statistics.median(r["extra_peak_gib"] for r in runs[k])})
    failed = sum(r.get("not_run", "").startswith("failed") for r in rows)
    stamp = f"{date.today().isoformat()}-{a.device.split(':')[0]}"
    run = {"date": date.today().isoformat(), "machine": machine(a.device), "shape": shape, "load_avg_1m_end": os.getloadavg()[0],
           "load_avg_1m_start": load_start, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("kernel", "result")}, "rows": rows}
    path = a.out / f"prefix_attention-{stamp}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    path.write_text(json.dumps({"runs": [*runs, run]}, indent=1))
    table = a.out / "prefix_attention.md"
    if not table.exists():
        table.write_text("| date | machine | shape | kernel | s/step | extra peak MiB | tok/s |\n|---|---|---|---|---|---|---|\n")
    with table.open("a") as f:
        for r in rows:
            cells = ([f"{r['seconds_mean']:.3f}", f"{r['extra_peak_gib'] * 1024:,.0f}", f"{r['tokens_per_s']:,.0f}"]
                     if "not_run" not in r else [f"not run: {r['not_run']}", "", ""])
            f.write(f"| {run['date']} | {run['machine']} | {shape} | {r['kernel']} | " + " | ".join(cells) + " |\n")
    print(f"wrote {path} and {table}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
