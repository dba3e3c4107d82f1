"""SFT training throughput: tokens/s, step time, MFU and peak memory on the project's real code path.

Random weights built from a config (never downloaded): `model=tiny` composed through Hydra with
`model.arch.*` overridden by the real shapes from conf/model/*.yaml. Each step is what
recipes/sft.py does with one micro-batch per rank: `distributed.init` -> `models.build_policy`
(activation checkpointing -> compile -> fully_shard) -> `Policy` forward on random token ids of
exactly --seq-len, every token after the first a target -> `sft_loss` over the all-reduced token
count -> backward -> grad clip -> AdamW step. The first --warmup steps are not timed.

MFU (model FLOPs utilisation; Chowdhery et al. 2022, "PaLM", appendix B; Kaplan et al. 2020):
    FLOPs/token = 6*N + 12*L*h*s,   MFU = FLOPs/token * global tokens/s / (peak FLOP/s * world size)
N = matmul parameters (q, k, v, o, gate, up, down of every block and the LM head, tied or not; not
the input embedding lookup, biases or norms), L layers, h hidden size, s = --seq-len (attention
counted in full, not halved for the causal mask, as in PaLM). Recomputation (activation
checkpointing, the chunked LM head) is not counted. Peak: bf16 dense datasheet figures by GPU name
(--peak-tflops overrides); on CPU a measured peak, the fastest 2048^3 fp32 matmul with this
process's threads on all ranks at once, the better of a measurement before and after the runs
(other processes can only make it look lower). On CPU the share of the cores that other processes
used during the timed steps is reported too: a shared machine skews every CPU number.

    .venv/bin/python benchmarks/train_throughput.py --seq-len 256 --micro-batch 8 --both-compile
    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/train_throughput.py --no-compile
    python benchmarks/train_throughput.py --model qwen2.5-1.5b --hardware h100x2 --seq-len 2048 --both-compile
    OMP_NUM_THREADS=8 torchrun --nproc_per_node=2 benchmarks/train_throughput.py --model qwen2.5-7b --hardware h100x2

Writes benchmarks/results/train_throughput-<date>-<machine>.json (appending to its "runs") and one
row per run to benchmarks/results/train_throughput.md. Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from grpo_fsdp import distributed
from grpo_fsdp.algorithms.sft import sft_loss
from grpo_fsdp.cli import CONF_DIR, UserError, compose, group_options
from grpo_fsdp.config import ConfigError
from grpo_fsdp.estimate import GIB, estimate_memory
from grpo_fsdp.estimate_table import format_table
from grpo_fsdp.models import build_policy, load_tokenizer
from grpo_fsdp.param_count import param_breakdown

# --model -> conf/model file whose `arch` holds the shapes (DeepSeek-R1-Distill-Qwen-7B has exactly
# Qwen2.5-7B's shapes: vocab 152064, hidden 3584, inter 18944, 28 layers, 28/4 heads, untied).
MODELS = {"tiny": "tiny", "qwen2.5-1.5b": "qwen2.5-1.5b", "qwen2.5-7b": "deepseek-r1-distill-qwen-7b"}
# bf16 dense tensor-core peak per GPU from NVIDIA's datasheets, which print the 2:4-sparse figure
# (twice these): H100 SXM5 and H200 1979 -> 989.4 TFLOPS, H100 NVL 1671, H100 PCIe 1513, HGX B200
# 4.5 PFLOPS; A100 312 dense. The first key found in torch.cuda.get_device_name() wins.
PEAK_BF16 = [("H100 NVL", 835e12), ("H100 PCIE", 756e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("A100", 312e12), ("B200", 2.25e15)]  # fmt: skip
TABLE_HEAD = ("| date | machine | model | profile | world | seq | micro-batch | compile | AC | tokens/s | MFU | peak mem |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--hardware", choices=group_options("hardware"), default="h100x2" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on GPU, 256 on CPU")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per rank per step; default 1 GPU, 8 CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after the warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: the profile's")
    p.add_argument("--both-compile", action="store_true", help="run without and with compile, side by side")
    p.add_argument("--ac", action=argparse.BooleanOptionalAction, default=None, help="activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args()


def configure(args, compile_: bool | None):
    arch = OmegaConf.load(CONF_DIR / "model" / f"{MODELS[args.model]}.yaml").arch
    over = [f"model.arch.{k}={v}" for k, v in arch.items() if k != "max_position_embeddings"]
    over.append(f"model.arch.max_position_embeddings={max(arch.get('max_position_embeddings', 0), args.seq_len)}")
    over += [f"data.max_length={args.seq_len}", f"train.micro_batch_size={args.micro_batch}"]  # for the estimate
    over += [] if compile_ is None else [f"hardware.compile={compile_}"]
    over += [] if args.ac is None else [f"hardware.activation_checkpointing={args.ac}"]
    return compose(["model=tiny", f"hardware={args.hardware}", *over])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), None)
    return f"{cpu or platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def peak_flops(d, args) -> tuple[float, str]:
    """Peak FLOP/s of one device, and where the number comes from."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device).upper()
        flops = next((f for key, f in PEAK_BF16 if key in name), None)
        if flops is None:
            raise UserError(f"no peak FLOP/s known for {name!r}; pass --peak-tflops")
        return flops, f"datasheet bf16 dense, {name}"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    torch.distributed.barrier()  # all ranks at once: they share the cores
    best, t_end = float("inf"), time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    flops = distributed.all_reduce_sum(2 * 2048**3 / best, d.device) / d.world_size
    return flops, f"measured: fastest fp32 2048^3 matmul, {torch.get_num_threads()} threads/rank"


def rss_gib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process; ru_maxrss where /proc is missing."""
    try:
        kib = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024 / GIB


def cpu_seconds() -> tuple[float, float]:
    """CPU-seconds used so far by the whole host (/proc/stat, steal included) and by this process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    except (OSError, ValueError):
        return 0.0, own.ru_utime + own.ru_stime
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def one_run(args, d, compile_: bool | None, say) -> dict:
    cfg = configure(args, compile_)
    hw, arch, o = cfg.hardware, cfg.model.arch, cfg.optim
    tokenizer = load_tokenizer(cfg.model)
    vocab = arch.vocab_size or len(tokenizer)
    pb = param_breakdown(arch, vocab_size=vocab)
    n_matmul = pb.num_layers * pb.layer_linear + vocab * arch.hidden_size  # the LM head counts even when tied
    flops_per_token = 6 * n_matmul + 12 * arch.num_layers * arch.hidden_size * args.seq_len
    est = estimate_memory(cfg, d.world_size, vocab)
    rec = {"model": args.model, "profile": hw.name, "world_size": d.world_size, "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "compile": hw.compile, "activation_checkpointing": hw.activation_checkpointing,
           "param_dtype": hw.param_dtype, "params": pb.total, "params_matmul": n_matmul, "flops_per_token": flops_per_token,
           "arch": OmegaConf.to_container(OmegaConf.structured(arch)), "estimated_gib_per_rank": est.total / GIB}  # fmt: skip
    say(f"\n== {args.model} on {hw.name}: world {d.world_size}, seq {args.seq_len}, micro-batch {args.micro_batch}, "
        f"compile {hw.compile}, AC {hw.activation_checkpointing}, {hw.param_dtype}; {args.warmup} warmup + {args.steps} steps")
    say(f"params {pb.total / 1e6:.1f} M (matmul N {n_matmul / 1e6:.1f} M); FLOPs/token 6N+12Lhs = {flops_per_token:.3e}")
    say(format_table(est, hw.gpu_memory_gib))
    if d.device.type == "cpu":  # all ranks share this host, and rank 0 also holds the full fp32 state dict
        import psutil

        need, free = (d.world_size * est.total + 4 * pb.total) / GIB, psutil.virtual_memory().available / GIB
        if distributed.broadcast_object(need > 0.9 * free):  # rank 0 decides for all
            return {**rec, "status": "not-run", "reason": f"needs ~{need:.1f} GiB host memory, {free:.1f} GiB available"}

    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)
    elif Path("/proc/self/clear_refs").exists():  # Linux: "5" resets VmHWM, so each run measures its own peak
        Path("/proc/self/clear_refs").write_text("5")
    base_rss = rss_gib("VmRSS")
    try:
        policy, hf_conf = build_policy(cfg.model, hw, tokenizer, d, cfg.train.seed, cfg.train.logprob_chunk_size)
        rec["attn_implementation"] = hf_conf._attn_implementation  # what ran: SDPA where flash-attn is missing
        optimizer = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        rec["params_built"] = sum(p.numel() for p in policy.parameters())  # DTensor numel is the global size
        gen = torch.Generator().manual_seed(1000 + d.rank)
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(d.device)  # [B, L]
        attention_mask = torch.ones_like(ids)  # [B, L]: no padding, every sequence exactly seq-len
        target_mask = torch.ones(args.micro_batch, args.seq_len - 1, dtype=torch.bool, device=d.device)  # [B, L-1]
        policy.train()
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                (host0, own0), wall0 = cpu_seconds(), time.perf_counter()
            t0 = time.perf_counter()
            global_tokens = distributed.all_reduce_sum(int(target_mask.sum()), d.device)
            logp, _ = policy(ids, attention_mask, target_mask)
            sft_loss(logp, target_mask, global_tokens).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            times.append(time.perf_counter() - t0)
        (host1, own1), wall = cpu_seconds(), time.perf_counter() - wall0
    except Exception as e:  # noqa: BLE001 -- a compile failure or OOM becomes a not-run row, not a crash
        return {**rec, "status": "not-run", "reason": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    finally:
        policy = optimizer = None
        gc.collect()
    t = torch.tensor(times, dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # ranks move in lockstep: the slowest
    timed = t.tolist()[args.warmup :]
    tokens_per_s = args.micro_batch * args.seq_len * d.world_size / statistics.fmean(timed)
    ours = distributed.all_reduce_sum(own1 - own0, d.device)  # CPU time of all ranks (on one host)
    other = max(0.0, (host1 - host0 - ours) / (wall * (os.cpu_count() or 1))) if host1 and d.device.type == "cpu" else None
    if d.device.type == "cuda":
        mem = {"max_allocated_gib": torch.cuda.max_memory_allocated(d.device) / GIB,
               "max_reserved_gib": torch.cuda.max_memory_reserved(d.device) / GIB}  # fmt: skip
    else:
        mem = {"peak_rss_gib": rss_gib("VmHWM"), "rss_increase_gib": rss_gib("VmHWM") - base_rss}
    m = torch.tensor(list(mem.values()), dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)  # the worst rank
    return {**rec, "status": "ok", "tokens_per_s": tokens_per_s, "step_s_mean": statistics.fmean(timed),
            "step_s_std": statistics.stdev(timed) if len(timed) > 1 else 0.0, "warmup_step_s": t.tolist()[: args.warmup],
            "achieved_tflops": flops_per_token * tokens_per_s / 1e12, "other_cpu_load": other,
            **dict(zip(mem, m.tolist()))}  # fmt: skip


def table_row(meta: dict, r: dict) -> str:
    if r["status"] != "ok":
        tps, mfu, mem = "not run: " + r["reason"].replace("|", "/"), "-", "-"
    else:
        tps, mfu = f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}"
        tps += f" (other processes used {r['other_cpu_load']:.0%} of the CPUs)" if (r["other_cpu_load"] or 0) > 0.05 else ""
        mem = (f"{r['max_allocated_gib']:.2f} alloc / {r['max_reserved_gib']:.2f} reserved GiB" if "max_allocated_gib" in r
               else f"RSS {r['peak_rss_gib']:.2f} GiB (+{r['rss_increase_gib']:.2f})")  # fmt: skip
    return (f"| {meta['date']} | {meta['device']} | {r['model']} | {r['profile']} | {r['world_size']} | {r['seq_len']} "
            f"| {r['micro_batch']} | {r['compile']} | {r['activation_checkpointing']} | {tps} | {mfu} | {mem} |\n")  # fmt: skip


def write(args, runs: list[dict], meta: dict) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{meta['world_size']}x-{meta['device']}".lower()).strip("-")[:60]
    path = args.out / f"train_throughput-{meta['date']}-{slug}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    launcher = f"torchrun --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}" if "LOCAL_WORLD_SIZE" in os.environ else "python"
    doc["runs"].append({**meta, "command": " ".join([launcher, *sys.argv]), "results": runs})
    path.write_text(json.dumps(doc, indent=2) + "\n")
    table = args.out / "train_throughput.md"
    if not table.exists():
        table.write_text("# SFT training throughput (benchmarks/train_throughput.py)\n\n" + TABLE_HEAD)
    with table.open("a") as f:
        f.writelines(table_row(meta, r) for r in runs)
    return path


def main() -> int:
    args = parse_args()
    gpu = compose([f"hardware={args.hardware}"]).hardware.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise UserError(f"--hardware {args.hardware} needs a CUDA device and none is visible; use --hardware cpu")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.micro_batch = args.micro_batch or (1 if gpu else 8)
    if args.seq_len < 2 or args.micro_batch < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--seq-len must be >= 2, --micro-batch >= 1, --steps >= 1, --warmup >= 0")
    d = distributed.init("cuda" if gpu else "cpu")
    say = print if d.is_main else (lambda *a, **k: None)
    meta = {"date": datetime.now().strftime("%Y-%m-%d"), "time": datetime.now().isoformat(timespec="seconds"),
            "device": device_name(d.device), "world_size": d.world_size, "torch": torch.__version__,
            "threads_per_rank": torch.get_num_threads(), "python": platform.python_version()}  # fmt: skip
    say(f"train_throughput: {meta['device']}, world {d.world_size}, torch {meta['torch']}, {meta['threads_per_rank']} threads/rank")
    before = peak_flops(d, args)
    runs = [one_run(args, d, c, say) for c in ((False, True) if args.both_compile else (args.compile,))]
    peak = before if gpu or args.peak_tflops else max(before, peak_flops(d, args))  # one denominator for all runs
    say(f"\nMFU against {peak[0] / 1e12:.3f} TFLOP/s per device ({peak[1]}); recomputation not counted\n\n{TABLE_HEAD}", end="")
    for r in runs:
        if r["status"] == "ok":
            r.update(peak_tflops_per_device=peak[0] / 1e12, peak_source=peak[1], mfu=r["achieved_tflops"] * 1e12 / (peak[0] * d.world_size))
            say(f"compile={r['compile']}: step {r['step_s_mean']:.4f} s (std {r['step_s_std']:.4f}), {r['achieved_tflops']:.3f} TFLOP/s")
        say(table_row(meta, r), end="")
    if d.is_main:
        say(f"wrote {write(args, runs, meta)} and {args.out / 'train_throughput.md'}")
    distributed.shutdown()
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, UserError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
