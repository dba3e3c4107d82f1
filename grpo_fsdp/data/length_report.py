"""`python -m grpo_fsdp.data.length_report`: token lengths of a data set, to choose data.max_length (issue 15 item 6).

    python -m grpo_fsdp.data.length_report data=preference data.path=pairs.jsonl model.path=<SFT export>
    python -m grpo_fsdp.data.length_report data=gsm8k data.path=../shared/data/gsm8k model=qwen2.5-1.5b coverage=0.95

Options besides the training's own overrides (data, model, ...): coverage=<share> (default 0.9), sample=<rows>
(default 1000; 0: the whole set), split=<name> (default data.train_split), seed= (default 0: which rows the
sample takes), out=<dir> (default outputs/length_report/<data>-<model>). A separate module from `lengths.py`
(which filters GRPO prompts at training time); this one only measures.

Rows are rendered and tokenized exactly as training does (templates.py, preference.py), without truncation. For
preference data a row is prompt, chosen, rejected; for math data (gsm8k, math, arithmetic) prompt and the SFT
target ("chosen"; rejected is 0). total = prompt + max(chosen, rejected): the longest row the pair makes.
Printed, and written as <out>/lengths.md, <out>/lengths.json and <out>/lengths.png:

  * percentiles 50/90/95/99 of prompt, chosen, rejected and total tokens: nearest-rank (the ceil(p/100 n)-th
    smallest value, a length that occurs in the data);
  * coverage: the share of rows whose total fits in 2k, 4k, 8k, 12k, 16k tokens (and the recommended length);
  * per max_length L, the mean tokens per row a step processes when rows are cut to L (prompt first, then
    completions, as training cuts them) and laid out (a) padded to L, one row per completion, (b) padding-free
    (packed: one row per completion, no padding), (c) pairs only: padding-free with the prompt once per pair
    (our shared-prompt layout); padding overhead = (a) / (b) - 1;
  * recommended data.max_length: the `coverage` percentile of total, rounded up to a multiple of 64, and the
    same for data.max_prompt_length from the prompt lengths.
The PNG is a histogram of total lengths with the cut-offs (grey) and the recommendation (red) marked, written
without plotting libraries (png.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from grpo_fsdp.cli import UserError, compose
from grpo_fsdp.config import ConfigError

OPTIONS = ("coverage", "sample", "split", "seed", "out")
CUTOFFS = (2048, 4096, 8192, 12288, 16384)
PERCENTILES = (50, 90, 95, 99)
ROUND = 64
PAIR_DATA = ("preference", "preference_arithmetic")


@dataclass(frozen=True)
class RowLengths:
    prompt: int
    chosen: int
    rejected: int = 0  # 0: not a pair

    @property
    def total(self) -> int:
        return self.prompt + max(self.chosen, self.rejected)


def nearest_rank(values: list[int], p: float) -> int:
    """The ceil(p/100 n)-th smallest of `values` (n >= 1)."""
    ordered = sorted(values)
    rank = math.ceil(round(p / 100 * len(ordered), 9))  # round: 0.9 * 100 is 90.00000000000001 in floats
    return ordered[max(1, rank) - 1]


def round_up(n: int, to: int = ROUND) -> int:
    return -(-n // to) * to


def layout_tokens(rows: list[RowLengths], L: int, pairs: bool) -> dict[str, float]:
    """Mean tokens per row at max_length L: padded to L, padding-free, and (pairs) padding-free with a shared prompt."""
    padded = packed = shared = 0
    for r in rows:
        p = min(r.prompt, L)
        c, j = min(r.chosen, L - p), min(r.rejected, L - p)
        sides = 2 if pairs else 1
        padded += sides * L
        packed += sides * p + c + (j if pairs else 0)
        shared += p + c + (j if pairs else 0)
    n = len(rows)
    out = {"padded": padded / n, "padding_free": packed / n, "padding_overhead": padded / packed - 1 if packed else 0.0}
    if pairs:
        out["shared_prompt"] = shared / n
    return out


def summarise(rows: list[RowLengths], coverage: float, pairs: bool, cutoffs=CUTOFFS) -> dict:
    """Everything the report prints, as a JSON-ready dict (see the module docstring)."""
    cols = {"prompt": [r.prompt for r in rows], "chosen": [r.chosen for r in rows]}
    if pairs:
        cols["rejected"] = [r.rejected for r in rows]
    totals = cols["total"] = [r.total for r in rows]
    recommended = round_up(nearest_rank(totals, 100 * coverage))
    lengths = sorted({*cutoffs, recommended})  # the cut-offs and the recommendation
    return {
        "rows": len(rows),
        "pairs": pairs,
        "percentiles": {k: {str(p): nearest_rank(v, p) for p in PERCENTILES} for k, v in cols.items()},
        "max": {k: max(v) for k, v in cols.items()},
        "coverage": {str(L): sum(t <= L for t in totals) / len(totals) for L in lengths},
        "layouts": {str(L): layout_tokens(rows, L, pairs) for L in lengths},
        "coverage_target": coverage,
        "recommended_max_length": recommended,
        "recommended_max_prompt_length": round_up(nearest_rank(cols["prompt"], 100 * coverage)),
    }


def markdown(rep: dict, title: str) -> str:
    cols = list(rep["percentiles"])
    lines = [f"# Sequence lengths: {title}", "", f"{rep['rows']} rows; tokens, nearest-rank percentiles.", "",
             "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for p in PERCENTILES:
        lines.append(f"| p{p} | " + " | ".join(str(rep["percentiles"][c][str(p)]) for c in cols) + " |")
    lines.append("| max | " + " | ".join(str(rep["max"][c]) for c in cols) + " |")
    shared = " | padding-free, shared prompt" if rep["pairs"] else ""
    lines += ["", f"| max_length | rows covered | padded to max_length | padding-free{shared} | padding overhead |",
              "|---|---|---|---|" + ("---|" if rep["pairs"] else "") + "---|"]
    for L, cov in rep["coverage"].items():
        lay = rep["layouts"][L]
        mid = f" | {lay['shared_prompt']:.1f}" if rep["pairs"] else ""
        lines.append(f"| {L} | {100 * cov:.1f}% | {lay['padded']:.1f} | {lay['padding_free']:.1f}{mid} | "
                     f"{100 * lay['padding_overhead']:.0f}% |")
    lines += ["", (f"Recommended for {100 * rep['coverage_target']:g}% coverage: data.max_length="
              f"{rep['recommended_max_length']} data.max_prompt_length={rep['recommended_max_prompt_length']} "
              f"(rounded up to a multiple of {ROUND}).")]
    return "\n".join(lines) + "\n"


def measure(cfg, split: str, sample: int, seed: int) -> tuple[list[RowLengths], bool]:
    """Token lengths of `sample` rows (0: all) of `split`, rendered as training renders them, with a progress bar."""
    from tqdm import tqdm

    from grpo_fsdp.models import load_tokenizer

    tokenizer, pairs = load_tokenizer(cfg.model), cfg.data.name in PAIR_DATA
    if pairs:
        from grpo_fsdp.data.preference import load_pairs as load
    else:
        from grpo_fsdp.data.loading import load_examples as load
    items = load(cfg.data, split, limit=0)
    if 0 < sample < len(items):
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), sample))]
    rows: list[RowLengths] = []
    with tqdm(total=len(items), desc="lengths", unit="row", file=sys.stderr) as bar:
        for lo in range(0, len(items), 256):
            chunk = items[lo : lo + 256]
            rows += _pair_lengths(chunk, tokenizer, cfg) if pairs else _example_lengths(chunk, tokenizer, cfg)
            bar.update(len(chunk))
    if not rows:
        raise UserError(f"data: no usable rows in {cfg.data.name}/{split} to measure; check data.path and data.name")
    return rows, pairs


def _pair_lengths(chunk, tokenizer, cfg) -> list[RowLengths]:
    from grpo_fsdp.data.preference import tokenize_pairs

    try:
        samples = tokenize_pairs(chunk, tokenizer, cfg.model.template, cfg.data.instruction, 10**9, 2 * 10**9, quiet=True)
    except UserError:  # every row of this chunk is unusable (training skips them too)
        return []
    return [RowLengths(len(s.prompt_ids), len(s.chosen_ids), len(s.rejected_ids)) for s in samples]


def _example_lengths(chunk, tokenizer, cfg) -> list[RowLengths]:
    from grpo_fsdp.data.templates import completion_text, encode_prompt, render_prompt

    out = []
    for ex in chunk:
        p = encode_prompt(tokenizer, render_prompt(tokenizer, ex.question, cfg.model.template, cfg.data.instruction))
        c = tokenizer(completion_text(ex, tokenizer, cfg.model.template), add_special_tokens=False)["input_ids"]
        out.append(RowLengths(len(p), len(c)))
    return out


def _option(opts: dict[str, str], name: str, default, kind, ok, fix: str):
    try:
        value = kind(opts.get(name, default))
    except ValueError:
        raise ConfigError(name, f"{opts[name]!r} is not a {kind.__name__}", fix) from None
    if not ok(value):
        raise ConfigError(name, f"{value} is out of range", fix)
    return value


def main(argv: list[str]) -> int:
    from grpo_fsdp.data.png import histogram_png

    opts, overrides = {}, []
    for arg in argv:
        name, eq, value = arg.partition("=")
        (opts.__setitem__(name, value) if eq and name in OPTIONS else overrides.append(arg))
    cfg = compose(overrides)
    coverage = _option(opts, "coverage", 0.9, float, lambda v: 0 < v <= 1, "give a share in (0, 1], e.g. coverage=0.9")
    sample = _option(opts, "sample", 1000, int, lambda v: v >= 0, "give a row count, e.g. sample=1000 (0: all rows)")
    seed = _option(opts, "seed", 0, int, lambda v: True, "give an integer, e.g. seed=0")
    split = opts.get("split", cfg.data.train_split)
    out = Path(opts.get("out") or os.path.join("outputs", "length_report", f"{cfg.data.name}-{cfg.model.name}"))
    rows, pairs = measure(cfg, split, sample, seed)
    rep = summarise(rows, coverage, pairs)
    text = markdown(rep, f"{cfg.data.name}/{split}, tokenizer of {cfg.model.tokenizer or cfg.model.path or cfg.model.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lengths.md").write_text(text)
    (out / "lengths.json").write_text(json.dumps(rep, indent=1) + "\n")
    histogram_png(out / "lengths.png", [r.total for r in rows], CUTOFFS, rep["recommended_max_length"])
    print(text + f"\nwrote {out}/lengths.md, lengths.json, lengths.png")
    return 0


if __name__ == "__main__":
    from grpo_fsdp.cli import run_main

    run_main(main)
