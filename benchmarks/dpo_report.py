"""The report of dpo_vs_trl.py: the machine's name, MFU, the median run of each side, and the Markdown table."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

from side_by_side import summarise


def machine(device: str) -> tuple[str, str]:
    """(the machine in words, its file-name slug): lscpu's model name and the core count, or the GPU's name."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        return f"1x {name}", re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    cores = os.cpu_count()
    return f"{name}, {cores} cores", re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-{cores}-cores"


def mfu(model_dir: Path, tokens_per_s: float | None) -> float | None:
    """6 N tokens/s over the device's bf16 peak (train_throughput.PEAK_BF16); N counts the matmul weights."""
    import torch
    from train_throughput import PEAK_BF16

    c = json.loads((model_dir / "config.json").read_text())
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + v * h
    peak = next((f for key, f in PEAK_BF16 if key in torch.cuda.get_device_name(0).upper()), None)
    return 6 * n * tokens_per_s / peak if peak and tokens_per_s else None


def side_summary(rs: list[dict]) -> dict:
    """side_by_side.summarise (the median-tokens/s run, max RSS) plus the medians of RSS and of the reference pass."""
    med = summarise(rs)
    ok = [r for r in rs if "tokens_per_s" in r]
    if ok:
        med["peak_rss_tree_mb_max"] = med["peak_rss_tree_mb"]
        med["peak_rss_tree_mb"] = statistics.median(r["peak_rss_tree_mb"] for r in ok)
        med["ru_maxrss_mb"] = statistics.median(r["ru_maxrss_mb"] for r in ok)
        refs = [r["ref_pass_seconds"] for r in ok if r.get("ref_pass_seconds")]
        med["ref_pass_seconds"] = statistics.median(refs) if refs else None
        with_ref = [r["tokens"] / (r["seconds"] + r["ref_pass_seconds"]) for r in ok if r.get("ref_pass_seconds")]
        med["tokens_per_s_with_ref_pass"] = statistics.median(with_ref) if with_ref else None
        med["tokens_per_cpu_s_runs"] = [r["tokens"] / r["step_cpu_seconds"] for r in ok if r.get("step_cpu_seconds")]
        med["tokens_per_cpu_s"] = statistics.median(med["tokens_per_cpu_s_runs"]) if med["tokens_per_cpu_s_runs"] else None
    return med


def write_md(path: Path, res: dict) -> None:
    s, o, t = res["settings"], res["ours"], res["trl"]

    def num(x, fmt="{:,.0f}"):
        return "—" if x is None else fmt.format(x)

    def row(name, r):
        if r.get("skipped") or "error" in r:
            what = "not run" if r.get("skipped") else f"failed (exit {r['rc']})"
            return f"| {name} | {what} |" + " |" * 10 + "\n"
        runs = ", ".join(f"{x:,.0f}" for x in r["tokens_per_s_runs"])
        return (f"| {name} | **{num(r['tokens_per_s'])}** ({runs}) | {num(r['steady_tokens_per_s'])} | "
                f"{num(r.get('tokens_per_s_with_ref_pass'))} | {num(r.get('tokens_per_cpu_s'))} | "
                f"{num(r.get('ref_pass_seconds'), '{:.2f}')} | {r['tokens']:,} | "
                f"**{num(r['peak_rss_tree_mb'])}** (max {num(r['peak_rss_tree_mb_max'])}) | {num(r['ru_maxrss_mb'])} | "
                f"{num(r.get('cuda_max_allocated_gib'), '{:.1f}')} | {num(r.get('mfu'), '{:.1%}')} | "
                f"{num(100 * r['other_cpu_share'], '{:.0f}%')} |\n")

    def phases(r):
        ph = dict(r.get("phase_seconds") or {})
        if "seconds" in r and "optimizer" in ph:  # ours: what the recipe does between its phases (logging, batching)
            ph["rest"] = r["seconds"] - sum(ph.values())
        return ", ".join(f"{k} {v:.2f}" for k, v in ph.items()) or "—"

    trl_ref = t.get("reference", "precomputed")
    if t.get("precompute_error"):
        trl_ref += f" — precompute_ref_log_probs=True failed: `{t['precompute_error']}`"
    text = (
        f"# DPO: ours vs TRL DPOTrainer (benchmarks/dpo_vs_trl.py)\n\n"
        f"{res['date']}, {res['machine']}. {s['steps']} steps x {s['batch']} pairs (micro-batch {s['micro_batch']}), "
        f"max_length {s['max_length']}, {s['prompt_tokens_note']}, sigmoid loss, beta {s['beta']}, lr {s['lr']}, {s['dtype']}, "
        f"{s['threads']} threads, {s['device']}; start model: {res['start_model']['source']}. Reference log-probs: ours "
        f"precomputed (one pass before training); TRL {trl_ref}. torch {res['versions']['torch']}, transformers "
        f"{res['versions']['transformers']}, trl {res['versions']['trl']}. Median of {s['repeats']} runs a side, the "
        "sides interleaved (alternating first) because the 2-core machine was shared with other work: contention "
        "falls on both; `other load` is the largest share of the cores other processes used during a run.\n\n"
        "| side | tokens/s (runs) | steps 2..N | with ref pass | tokens per CPU-s | ref pass s | tokens | peak RSS tree MB | "
        "trainer maxrss MB | CUDA peak GiB | MFU | other load |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + row("ours", o) + row("TRL", t) +
        f"\nratio ours/TRL: **{num(res['ratio'], '{:.2f}')}x** tokens/s (steps 2..N {num(res['steady_ratio'], '{:.2f}')}x; "
        f"with the reference pass {num(res['ratio_with_ref_pass'], '{:.2f}')}x; per CPU-second "
        f"{num(res['cpu_ratio'], '{:.2f}')}x); peak RSS ours/TRL "
        f"{num(res['rss_ratio'], '{:.2f}')}. Goal (issue 15): >= 2.0x at <= TRL's peak RSS: "
        f"**{'met' if res['goal_met'] else 'not met'}**.\n\n"
        f"Phase seconds of the median run (the timed steps; the reference pass apart): ours {phases(o)}; TRL {phases(t)}.\n\n"
        f"Tokens per step equal on both sides: {res['tokens_match']}; TRL rows tokenized differently from ours: "
        f"{t.get('rows_tokenized_differently', '—')}. Loss, step 1 -> {s['steps']}: ours "
        f"{' '.join(f'{x:.4f}' for x in o.get('loss', [])[:1] + o.get('loss', [])[-1:])}, TRL "
        f"{' '.join(f'{x:.4f}' for x in t.get('loss', [])[:1] + t.get('loss', [])[-1:])}.\n\n"
        f"```\n{res['command']}\n```\n"
    )
    path.write_text(text)
