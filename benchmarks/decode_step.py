"""One decode step's vocabulary work against its floor, the LM-head matmul alone (issue 13, item 1).

    .venv/bin/python benchmarks/decode_step.py                      # B 64, V 151,665, H 128 and 1536, fp32
    .venv/bin/python benchmarks/decode_step.py --hidden 128 --repeats 5
    .venv/bin/python benchmarks/decode_step.py --unused-bias 30    # a trained model's shape: the race prunes

For B rows of last hidden states [B, H] and a head W [V, H] (V = 151,665, Qwen2.5's tokenizer):

  head      F.linear(h, W): the logits [B, V], the floor every engine pays
  before    head + the sampler as it was before issue 13: counter-based noise as a fresh [B, V]
            tensor per operation, softmax / noise, argmax, and logsumexp for the sampled log-prob
  after     head + `rollout.sampler.Sampler.sample` (block-wise, in place, no softmax materialised, int32
            noise, the race on the tokens that can win only)

Timing: the three are interleaved in one process (head, before, after, head, ...) and each is the
median of --repeats rounds, so a shared machine slows all three alike; `x floor` = time / head
time. Temperature 1.0, no truncation (the benchmark's and GRPO's default); --temperature and
--top-k/--top-p add the truncation path. Writes benchmarks/results/decode_step.json and appends
to benchmarks/results/decode_step.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def before_sample(logits, sampling, streams, step):
    """The pre-issue-13 sampler, verbatim in substance: whole-tensor noise, softmax, race, logsumexp."""
    import torch

    from grpo_fsdp.rollout.noise import exponential_noise
    from grpo_fsdp.rollout.sampler import truncate_logits

    logits = logits.float()
    noise = exponential_noise(streams, step, logits.shape[-1])
    scaled = logits / sampling.temperature
    kept = truncate_logits(scaled, sampling.top_k, sampling.top_p)
    tokens = (kept.softmax(dim=-1) / noise).argmax(dim=-1)
    logp = scaled.gather(-1, tokens[:, None]).squeeze(-1) - scaled.logsumexp(dim=-1)
    return tokens, logp, torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151_665)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 1536])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--unused-bias", type=float, default=0.0,
                   help="logits of all but 1,000 random tokens this many nats lower: a trained model's shape, where "
                        "most of the vocabulary is never in play (the sampler then races only the survivors)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args(argv)

    import torch

    from grpo_fsdp.rollout import SamplingConfig
    from grpo_fsdp.rollout.noise import stream_ids
    from grpo_fsdp.rollout.sampler import Sampler

    sampling = SamplingConfig(n=1, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, max_new_tokens=1)
    streams = torch.tensor(stream_ids(0, list(range(a.batch)), [0] * a.batch))
    cpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), platform.processor())
    rows = []
    for H in a.hidden:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(a.vocab, H, generator=g) * 0.02
        h = torch.randn(a.batch, H, generator=g)
        bias = torch.full((a.vocab,), -a.unused_bias)
        bias[torch.randperm(a.vocab, generator=g)[:1000]] = 0.0
        sampler = Sampler(sampling, a.vocab, torch.device("cpu"))
        t = {"head": [], "before": [], "after": []}
        for r in range(a.repeats + 1):
            for name in ("head", "before", "after"):
                t0 = time.perf_counter()
                logits = torch.nn.functional.linear(h, W, bias)
                if name == "before":
                    tok_b, lp_b, _ = before_sample(logits, sampling, streams, r)
                elif name == "after":
                    tok_a, lp_a = sampler.sample(logits, streams, r)
                dt = time.perf_counter() - t0
                if r:  # round 0 warms up (allocations, thread pool)
                    t[name].append(dt)
        same = bool(torch.equal(tok_a, tok_b)) and float((lp_a - lp_b).abs().max()) < 1e-5
        med = {k: statistics.median(v) for k, v in t.items()}
        row = {"hidden": H, "batch": a.batch, "vocab": a.vocab, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
               "before_x_floor": med["before"] / med["head"], "after_x_floor": med["after"] / med["head"],
               "speedup": med["before"] / med["after"], "same_tokens_and_logprobs": same,
               "raced_share": sampler.survivors / max(sampler.raced, 1),
               "all_ms": {k: [round(1e3 * x, 2) for x in v] for k, v in t.items()}}
        rows.append(row)
        print(f"H {H}: head {row['head_ms']:.1f} ms | before {row['before_ms']:.1f} ms ({row['before_x_floor']:.2f}x floor) | "
              f"after {row['after_ms']:.1f} ms ({row['after_x_floor']:.2f}x floor) | same samples: {same}", flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    out = {"date": date.today().isoformat(), "cpu": model, "threads": torch.get_num_threads(), "loadavg": load,
           "torch": torch.__version__, "sampling": {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p},
           "command": " ".join([".venv/bin/python", "benchmarks/decode_step.py", *(argv if argv is not None else sys.argv[1:])]),
           "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "decode_step.json").write_text(json.dumps(out, indent=2) + "\n")
    md = a.out / "decode_step.md"
    text = "" if md.exists() else ("# One decode step vs the LM-head matmul (benchmarks/decode_step.py)\n\n"
                                   "Median ms of interleaved rounds in one process; `x floor` = time / head matmul alone.\n")
    text += (f"\n## {out['date']}: {model}, {out['threads']} threads, load average {' '.join(load)}, torch {torch.__version__}\n\n"
             f"B {a.batch}, V {a.vocab:,}, fp32, T {a.temperature}, top-k {a.top_k}, top-p {a.top_p}, "
             f"unused-token bias -{a.unused_bias:g} (all but 1,000 tokens; 0: a flat random head), raced "
             f"{sum(r['raced_share'] for r in rows) / len(rows):.1%} of the vocabulary.\n\n"
             "| H | head ms (floor) | before ms | before x floor | after ms | after x floor | same samples |\n|---|---|---|---|---|---|---|\n"
             + "".join(f"| {r['hidden']} | {r['head_ms']:.1f} | {r['before_ms']:.1f} | {r['before_x_floor']:.2f} | "
                       f"{r['after_ms']:.1f} | {r['after_x_floor']:.2f} | {r['same_tokens_and_logprobs']} |\n" for r in rows)
             + f"\n```\n{out['command']}\n```\n")
    with open(md, "a") as f:
        f.write(text)
    return 0 if all(r["same_tokens_and_logprobs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
