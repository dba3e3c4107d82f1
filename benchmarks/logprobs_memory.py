"""Chunked token log-probs against full logits: peak memory and time of forward + backward.

    .venv/bin/python benchmarks/logprobs_memory.py                  # vocab 151,665, seq 2048, hidden 1536, fp32
    .venv/bin/python benchmarks/logprobs_memory.py --seq 512 --iters 1 --variants full,256

The LM head at Qwen2.5-1.5B's shapes (hidden 1536, vocabulary 151,665 as in its tokenizer) on one
sequence of --seq tokens, in fp32 on the CPU (on a GPU with --device cuda). Each variant computes
the log-prob of a target token at every position and backpropagates `logp.sum()` into the hidden
states and the head weight (both require grad, as in training):

  full        log_softmax(hidden @ W.T, -1).gather(targets): plain autograd, which keeps the
              [seq, vocab] logits and their log_softmax for backward;
  <n>         grpo_fsdp.logprobs.chunked_token_logprobs(hidden, W, targets, chunk_size=n):
              n tokens at a time, keeping only each token's log-normaliser; its hand-written
              backward recomputes a chunk's logits at a time and accumulates W's gradient in
              one [V, H] buffer (until 2026-11-23 it was activation checkpointing per chunk,
              whose backward allocated a [V, H] gradient per chunk: the first results below);
  all         the same with chunk_size = seq: one chunk.
  f<n>        grpo_fsdp.logprobs.fused_token_loss: n tokens at a time over the whole vocabulary, the
              loss's gradient (1 per kept token) applied in forward (Liger's fused linear cross-entropy
              pattern): 3 matmuls instead of 4, an fp32 [V, H] gradient accumulator (issue 13 item 3).

Every variant runs in its own process (python's and torch's allocations are counted alike only
by the kernel), so its numbers do not depend on what ran before it:

  extra peak  ru_maxrss of the process (the kernel's high-water mark of its RSS) minus its RSS
              just before the first forward, when the inputs and W (932 MB at these shapes)
              already exist and the same code has run once on 16 tokens x 64 vocab entries
              (lazy imports, autograd threads: one-off costs common to all variants). It includes W.grad (the same 932 MB for every variant, allocated in
              backward) and hidden.grad; `extra_minus_grads` subtracts those two. On CUDA the
              same from torch.cuda.max_memory_allocated / memory_allocated.
  time        wall clock of forward + backward, the median over --iters iterations after one
              untimed warm-up (W.grad is dropped between iterations, so each allocates it anew).
  check       max |logp - logp_full| and the relative difference of |hidden.grad| against the
              full variant: chunking must not change the result.
  interleaved one more process runs every variant in turn (full, 256, ..., full, 256, ...) for
              --iters rounds after a warm-up round and takes each one's median: on a shared
              machine the load slows all variants alike, so `time vs full (interleaved)` is the
              ratio to trust; the per-process seconds are kept beside it.
  goal        issue 13: extra peak <= 0.25x the full variant's (the measure behind "chunk 256
              costs 0.32x the memory of full fp32 logits") at <= 1.0x its time (interleaved).

--keep 0.2 puts the loss on a random 20% of the tokens, as the entropy mask does (algo.entropy_top_quantile,
issue 16): the chunked head's backward then runs on those rows only (grpo_fsdp/logprobs.py); full logits
gain nothing from it (autograd through the [seq, vocab] softmax is dense).

Since issue 13 the chunked head works on blocks of vocabulary columns for all tokens at once
([N, chunk x V / N] logits, see grpo_fsdp/logprobs.py): one buffer of chunk x V fp32 logits
(two with entropy), the weight gradient written once per row block.

The expected extra memory of a chunk is chunk x vocab x 4 bytes of logits, a few times over (the
logits, the softmax and the logits' gradient): 155 MB per copy per 256 tokens at this vocabulary;
the full variant keeps seq x vocab x 4 bytes (1.24 GB at 2048 tokens) several times over.

Writes benchmarks/results/logprobs_memory.json and appends a dated section to
benchmarks/results/logprobs_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

DATE = date.today().isoformat()
MACHINE = "2-core CPU, 24 GiB, no GPU"
MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=151_665)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--variants", default="full,256,1024,all",
                   help="comma list of full, all, chunk sizes (the blocked head), f<chunk> (the fused head, token chunks)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--entropy", action="store_true", help="also compute the entropy (chunked variants; full adds it too)")
    p.add_argument("--keep", type=float, default=1.0,
                   help="the loss on this share of the tokens only (the entropy mask, issue 16: 0.2); the rest get zero gradient")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def keep_mask(n: int, share: float, generator):
    """[n] bool with ceil(share x n) True at random places (all True at share 1): the tokens the loss reads."""
    import math

    import torch

    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[: math.ceil(share * n)]] = True
    return keep


def kept_grad(kept):
    """fused_token_loss's token_grad for the loss sum(logp over kept tokens): its value and gradient 1 / 0 per token."""

    def token_grad(lp, lo, hi):
        k = kept[lo:hi]
        return lp[k].sum(), k.float()

    return token_grad


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# one variant, in a child process
# ---------------------------------------------------------------------------------------------
def run_variant(a: argparse.Namespace) -> dict:
    import torch

    from grpo_fsdp.logprobs import chunked_token_logprobs, fused_token_loss

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(a.seq, a.hidden, generator=g)).to(dev).requires_grad_(True)  # [N, H]
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dev).requires_grad_(True)  # [V, H]
    targets = torch.randint(0, a.vocab, (a.seq,), generator=g).to(dev)  # [N]
    kept = keep_mask(a.seq, a.keep, g).to(dev)  # [N]

    def step(hidden, weight, targets):
        kept_ = kept[: hidden.shape[0]]
        if a.variant == "full":
            logits = hidden @ weight.T  # [N, V]
            logprobs = torch.log_softmax(logits, dim=-1)
            logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
            loss = torch.where(kept_, logp, 0.0).sum()
            if a.entropy:
                loss = loss + (-(logprobs.exp() * logprobs).sum(-1)).sum()
        elif a.variant.startswith("f"):
            loss, logp, _ = fused_token_loss(hidden, weight, targets, int(a.variant[1:]), kept_grad(kept_))
        else:
            chunk = hidden.shape[0] if a.variant == "all" else int(a.variant)
            logp, ent = chunked_token_logprobs(hidden, weight, targets, chunk, with_entropy=a.entropy)
            loss = torch.where(kept_, logp, 0.0).sum() + (ent.sum() if a.entropy else 0)
        loss.backward()
        return logp.detach()

    # warm up the code path on small tensors (lazy imports, autograd threads, kernel caches), so
    # that one-off allocations are not billed to the variant: they are the same for all of them
    small = [torch.randn(16, a.hidden, device=dev, requires_grad=True), torch.randn(64, a.hidden, device=dev, requires_grad=True),
             torch.randint(0, 64, (16,), device=dev)]
    step(*small)
    del small
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    before_rss = rss_bytes()
    times = []
    logp = None
    for i in range(1 + a.iters):
        hidden.grad = weight.grad = None
        t = time.perf_counter()
        logp = step(hidden, weight, targets)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = (weight.grad.numel() + hidden.grad.numel()) * weight.element_size()
    if cuda:
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = peak_rss - before_rss
    return {
        "variant": a.variant, "extra_peak_mb": extra / MB, "extra_minus_grads_mb": (extra - grads) / MB,
        "grads_mb": grads / MB, "rss_before_mb": before_rss / MB, "peak_rss_mb": peak_rss / MB,
        "seconds": statistics.median(times) if times else None, "seconds_all": times,
        "threads": torch.get_num_threads(), "logp": logp.cpu().tolist(), "hidden_grad_norm": float(hidden.grad.norm()),
        "weight_grad_norm": float(weight.grad.norm()),
    }


def run_interleaved(a: argparse.Namespace, variants: list[str]) -> dict:
    """Every variant in turn in this one process, --iters rounds after a warm-up round: median seconds each."""
    import torch

    from grpo_fsdp.logprobs import chunked_token_logprobs, fused_token_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.seq, a.hidden, generator=g).to(a.device).requires_grad_(True)
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(a.device).requires_grad_(True)
    targets = torch.randint(0, a.vocab, (a.seq,), generator=g).to(a.device)
    kept = keep_mask(a.seq, a.keep, g).to(a.device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(1 + a.iters):
        for v in variants:
            hidden.grad = weight.grad = None
            t = time.perf_counter()
            if v == "full":
                logprobs = torch.log_softmax(hidden @ weight.T, dim=-1)
                loss = torch.where(kept, logprobs.gather(-1, targets[:, None]).squeeze(-1), 0.0).sum()
                if a.entropy:
                    loss = loss + (-(logprobs.exp() * logprobs).sum(-1)).sum()
                del logprobs
            elif v.startswith("f"):
                loss, _, _ = fused_token_loss(hidden, weight, targets, int(v[1:]), kept_grad(kept))
            else:
                logp, ent = chunked_token_logprobs(hidden, weight, targets, a.seq if v == "all" else int(v), with_entropy=a.entropy)
                loss = torch.where(kept, logp, 0.0).sum() + (ent.sum() if a.entropy else 0)
            loss.backward()
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                times[v].append(time.perf_counter() - t)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"seconds": {v: statistics.median(ts) for v, ts in times.items()}, "seconds_all": times, "loadavg_after": load}


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "grpo-fsdp"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write_md(path: Path, res: dict) -> None:
    s = res["settings"]
    rows = []
    for r in res["variants"]:
        if "error" in r:
            rows.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |")
            continue
        mem = res["extra_peak_vs_full"].get(r["variant"])
        tvf = (res.get("time_vs_full_interleaved") or {}).get(r["variant"])
        inter = (res.get("interleaved") or {}).get("seconds", {}).get(r["variant"])
        goal = "" if mem is None or tvf is None or r["variant"] == "full" else ("yes" if mem <= 0.25 and tvf <= 1.0 else "no")
        rows.append(f"| {r['variant']} | {r['extra_peak_mb']:,.0f} | {r['extra_minus_grads_mb']:,.0f} | "
                    f"{'—' if mem is None else f'{mem:.2f}'} | {r['seconds']:.1f} | {'—' if inter is None else f'{inter:.1f}'} | "
                    f"{'—' if tvf is None else f'{tvf:.2f}'} | {goal} | "
                    f"{r['max_abs_logp_diff_vs_full']:.1e} | {r['hidden_grad_rel_diff_vs_full']:.1e} |")
    text = (
        f"\n## {res['date']}: {res['machine']}\n\n"
        f"vocab {s['vocab']:,}, seq {s['seq']}, hidden {s['hidden']}, fp32 on {s['device']}, forward + backward into hidden "
        f"and W, entropy {'on' if s['entropy'] else 'off'}, loss on {s.get('keep', 1.0):.0%} of the tokens, {res['threads']} threads, torch {res['versions']['torch']}; "
        f"W.grad + hidden.grad = {res['grads_mb']:,.0f} MB (in every variant's extra peak).\n\n"
        "| variant | extra peak MB | extra minus grads MB | extra peak vs full | seconds (own process) | seconds (interleaved) "
        "| time vs full (interleaved) | goal (<= 0.25x, <= 1.0x) | max abs logp diff vs full | hidden.grad rel diff |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nCPU: {res.get('cpu', '?')}; load average before / after: {res.get('loadavg_before')} / "
        f"{(res.get('interleaved') or {}).get('loadavg_after')}.\n\n```\n{res['command']}\n```\n"
    )
    if not path.exists():
        text = ("# Chunked log-probs vs full logits (benchmarks/logprobs_memory.py)\n\n"
                "Peak memory above the inputs (ru_maxrss minus RSS before the first forward, one process per variant) "
                "and forward + backward time; see the module docstring.\n") + text
    with open(path, "a") as f:
        f.write(text)


def main(argv=None) -> int:
    a = parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if a.variant == "interleaved":
        a.result.write_text(json.dumps(run_interleaved(a, variants)))
        return 0
    if a.variant is not None:
        a.result.write_text(json.dumps(run_variant(a)))
        return 0
    results = []
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = Path(tmp) / f"{v}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", v, "--result", str(out), "--vocab", str(a.vocab),
                   "--seq", str(a.seq), "--hidden", str(a.hidden), "--iters", str(a.iters), "--device", a.device,
                   "--keep", str(a.keep), *(["--entropy"] if a.entropy else [])]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                print(f"{v}: FAILED ({err})", flush=True)
                results.append({"variant": v, "error": err, "rc": r.returncode})
                continue
            res = json.loads(out.read_text())
            res["process_seconds"] = time.perf_counter() - t0
            results.append(res)
            print(f"{v}: extra peak {res['extra_peak_mb']:,.0f} MB (minus grads {res['extra_minus_grads_mb']:,.0f} MB), "
                  f"fwd+bwd {res['seconds']:.2f} s", flush=True)
        inter_out = Path(tmp) / "interleaved.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", "interleaved", "--variants", ",".join(variants),
               "--result", str(inter_out), "--vocab", str(a.vocab), "--seq", str(a.seq), "--hidden", str(a.hidden),
               "--iters", str(a.iters), "--device", a.device, "--keep", str(a.keep), *(["--entropy"] if a.entropy else [])]
        r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
        inter = json.loads(inter_out.read_text()) if r.returncode == 0 and inter_out.exists() else None
        if inter is None:
            print(f"interleaved timing FAILED: {(r.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        else:
            print("interleaved fwd+bwd seconds (median): " + ", ".join(f"{v} {x:.2f}" for v, x in inter["seconds"].items()))
    ref = next((r for r in results if r.get("variant") == "full" and "logp" in r), None)
    ref_logp = ref["logp"] if ref is not None else None
    for r in results:
        if "logp" not in r:
            continue
        if ref is not None:
            r["max_abs_logp_diff_vs_full"] = max(abs(x - y) for x, y in zip(r["logp"], ref_logp))
            r["hidden_grad_rel_diff_vs_full"] = abs(r["hidden_grad_norm"] - ref["hidden_grad_norm"]) / ref["hidden_grad_norm"]
        else:
            r["max_abs_logp_diff_vs_full"] = r["hidden_grad_rel_diff_vs_full"] = float("nan")
        r["logp_sum"] = sum(r.pop("logp"))
    ok = [r for r in results if "extra_peak_mb" in r]
    if ref is None:
        print("no full variant: the logp / grad checks are left empty", flush=True)
    full = next((r for r in ok if r["variant"] == "full"), None)
    cpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    out = {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), platform.processor()),
        "loadavg_before": load_before,
        "date": DATE, "run_date": date.today().isoformat(), "machine": MACHINE, "platform": platform.platform(),
        "command": " ".join([".venv/bin/python", "benchmarks/logprobs_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"vocab": a.vocab, "seq": a.seq, "hidden": a.hidden, "dtype": "float32", "device": a.device,
                     "iters": a.iters, "entropy": a.entropy, "keep": a.keep,
                     "loss": "logp.sum() over the kept tokens (+ entropy.sum())", "grad_into": ["hidden", "W"]},
        "memory_measure": "ru_maxrss - RSS before the first forward, one process per variant" if a.device == "cpu"
                          else "torch.cuda.max_memory_allocated - memory_allocated before the first forward",
        "threads": ok[0]["threads"] if ok else None, "grads_mb": ok[0]["grads_mb"] if ok else None,
        "full_logits_mb": a.seq * a.vocab * 4 / MB,
        "variants": results,
        "memory_saving_vs_full": {r["variant"]: full["extra_minus_grads_mb"] / r["extra_minus_grads_mb"]
                                  for r in ok if full is not None and r["extra_minus_grads_mb"] > 0},
        "time_vs_full": {r["variant"]: r["seconds"] / full["seconds"] for r in ok if full is not None},
        "interleaved": inter,
        "time_vs_full_interleaved": ({v: x / inter["seconds"]["full"] for v, x in inter["seconds"].items()}
                                     if inter is not None and "full" in inter["seconds"] else None),
        "extra_peak_vs_full": {r["variant"]: r["extra_peak_mb"] / full["extra_peak_mb"] for r in ok if full is not None},
        "goal": "issue 13: extra peak <= 0.25x the full variant's, time <= 1.0x full (interleaved)",
        "versions": versions(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "logprobs_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    write_md(a.out / "logprobs_memory.md", out)
    print(f"wrote {a.out / 'logprobs_memory.json'} and {a.out / 'logprobs_memory.md'}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
