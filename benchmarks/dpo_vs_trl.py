"""Our DPO recipe against TRL's `DPOTrainer`, side by side on one machine: tokens/s and peak memory (issue 15).

    .venv/bin/python benchmarks/dpo_vs_trl.py --threads 1        # tiny SFT model, 16 pairs x 20 steps, 3 runs a side
    .venv/bin/python benchmarks/dpo_vs_trl.py --sides ours --repeats 1 --ours-extra algo.shared_prefix=false
    # GPU (one device): Qwen2.5-1.5B shapes, random weights, real tokenizer, ~4k-token pairs, bf16, MFU
    .venv/bin/python benchmarks/dpo_vs_trl.py --device cuda --shapes qwen2.5-1.5b --prompt-tokens 3900 \\
        --max-length 4096 --max-prompt-length 4000 --batch 8 --micro-batch 1 --steps 8 --repeats 1

On a shared CPU use --threads 1: with more OpenMP threads than free cores both sides spin-wait and slow down
several-fold (measured here: 360 vs 132 tokens/s at 2 threads on a loaded 2-core machine, ~2,700 at 1 thread).

Needs `trl` (measured with trl 1.16.0 beside transformers 5.19 / torch 2.13). The GRPO side-by-side
(side_by_side.py, shared with grpo_vs_trl.py) lends this file its start model, its child runner (RSS polling) and its summary.

What runs, in one invocation:
  0. the start model (a temporary directory): `--shapes tiny` is grpo_vs_trl's (the tiny Qwen2 model of
     conf/model/tiny.yaml after --sft-steps of our SFT on arithmetic); `--shapes qwen2.5-1.5b` is that
     architecture (conf/model/qwen2.5-1.5b.yaml) with random weights saved in bf16 and the Qwen2.5 tokenizer of
     ../shared/tokenizers/qwen2.5. The data: the synthetic preference set (data/preference_arithmetic.py,
     --pairs = steps x batch rows, chosen the worked solution, rejected one wrong step carried on) written as a
     JSONL file of prompt/chosen/rejected strings; `--prompt-tokens N` prepends solved problems to each prompt
     until it holds about N tokens (long-context shapes on a GPU). Both sides read that file.
  1. ours: `python -m grpo_fsdp.train algo=dpo data=preference data.path=<file> ...` in its own process:
     reference log-probs in one pass before training (algo.precompute_ref=true), pairs in the shared-prefix
     layout (each prompt once), FSDP2 policy with the chunked LM head.
  2. TRL: `DPOTrainer` in its own process (this file with `--side trl`), precompute_ref_log_probs=True (if
     that raises, the error is recorded and TRL runs again with its online reference; the table says so).
     Its dataset is the same rows, rendered by our template code, in exactly our order: the rows of each of
     our micro-batches in turn (`global_batch_indices` + `split_for_rank`), read with a sequential sampler.

Matched: weights, rows, order and micro-batches; max_length (ours also cuts prompts at max_prompt_length, which
the default data never reaches); loss sigmoid, beta, label smoothing 0; pairs per micro-batch and per optimizer
step; AdamW (0.9, 0.999), eps 1e-8, no weight decay, constant lr without warmup, grad clip 1.0; fp32 on CPU
(bf16 autocast / mixed precision with --dtype bfloat16), SDPA attention, no activation checkpointing (TRL's
default of True is turned off), no dropout, the same thread count (OMP_NUM_THREADS=--threads, both sides).
Not matched: how each side computes (ours: each prompt once for both completions, completions padded only within
length blocks; TRL: [prompt + chosen] and [prompt + rejected] rows padded to the longest of the micro-batch, its
fused chunked LM head); ours writes its reference cache to disk and a final checkpoint (outside the timed window).

Measured (each side --repeats times, own process each, the order alternating so that a shared machine's load
falls on both alike; the median run is reported and every run is kept in the JSON):
  tokens    prompt + chosen + rejected tokens of the pairs trained on, no padding, each prompt counted once
            (ours: perf/tokens_per_s x perf/step_seconds; TRL: from its tokenized dataset rows); both are
            checked equal per step.
  time      start of step 1 to end of step N (process start, imports, model load, the reference pass and the
            final checkpoint excluded), as grpo_vs_trl.py times it; `steady` excludes step 1. The reference pass
            is timed on its own (ours: its log line; TRL: `_precompute_ref_logps`), and `with ref pass`
            divides the tokens by steps + that pass. `tokens per CPU-s` divides them by the trainer's CPU time
            inside the steps (ours: perf/cpu_seconds; TRL: time.process_time around each step): with one thread
            a side it measures the work, which the other processes of a shared machine do not stretch as they
            stretch the wall clock.
  peak RSS  the child's process tree polled every 50 ms, and ru_maxrss of the trainer (os.wait4).
  CUDA      peak allocated GiB (ours: system/rank0/cuda_max_allocated_gib; TRL: torch.cuda.max_memory_allocated)
            and MFU = 6 N tokens/s / peak (N: matmul parameters, LM head included; the tokens as counted
            above, so FLOPs spent on a prompt's second copy or on padding do not count; attention, the reference
            pass and recomputation not counted either), peak from train_throughput.py's datasheet table.

Writes benchmarks/results/dpo_vs_trl-<date>-<cpu or gpu>.{json,md}. Exit code 1 when a side failed.
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
import tempfile
import time
from datetime import date
from pathlib import Path

from dpo_report import machine, mfu, side_summary, write_md
from side_by_side import REPO, build_start_model, child_env, run_child, save_random_qwen2, tail, timed, versions

REF_LINE = re.compile(r"reference log-probs: \d+ shards scored in ([0-9.]+) s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps, each side")
    p.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward")
    p.add_argument("--pairs", type=int, default=0, help="rows of the data set (0: steps x batch, one epoch)")
    p.add_argument("--max-length", type=int, default=192, help="prompt + completion tokens (both sides)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="ours only (TRL 1.16 has none)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="prepend solved problems up to ~this many prompt tokens")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of both sides")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--shapes", choices=["tiny", "qwen2.5-1.5b"], default="tiny")
    p.add_argument("--sft-steps", type=int, default=60, help="tiny: SFT steps for the start model (0: random init)")
    p.add_argument("--model-dir", type=Path, default=None, help="start from this HF directory instead")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO.parent / "shared" / "tokenizers" / "qwen2.5")
    p.add_argument("--sides", default="ours,trl", help="comma list: ours, trl")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating order; the median is reported")
    p.add_argument("--trl-online", action="store_true", help="TRL with its online reference model (no precompute)")
    p.add_argument("--ours-extra", nargs="*", default=[], help="extra overrides for our side only")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name-suffix", default="", help="appended to the result files' names (e.g. -long-prompts)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (model, data, run dirs, logs)")
    p.add_argument("--side", choices=["trl"], default=None, help=argparse.SUPPRESS)  # internal: the TRL child
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.pairs = a.pairs or a.steps * a.batch
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.vocab = "tiny"  # side_by_side.build_start_model's field: the tiny model's own tokenizer
    if a.batch % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide --batch {a.batch}")
    if a.steps < 2 and a.side is None:
        p.error(f"--steps {a.steps}: needs at least 2 (the steady figures time steps 2..N)")
    return a


def our_overrides(a: argparse.Namespace, model_dir: Path, data: Path) -> list[str]:
    """Our recipe's settings; the TRL child composes the same list to read, render and order the same rows."""
    hardware = ["hardware=h100x2", "hardware.attn_implementation=sdpa", "hardware.compile=false", "hardware.activation_checkpointing=false"] if a.device == "cuda" else []
    return [
        "algo=dpo", "data=preference", f"data.path={data}", f"model.path={model_dir}", *hardware,
        f"hardware.param_dtype={a.dtype}", f"data.max_length={a.max_length}", f"data.max_prompt_length={a.max_prompt_length}",
        f"train.max_steps={a.steps}", f"train.global_batch_size={a.batch}", f"train.micro_batch_size={a.micro_batch}",
        f"train.seed={a.seed}", "algo.loss=sigmoid", f"algo.beta={a.beta}", "algo.label_smoothing=0.0",
        "algo.precompute_ref=true", f"optim.lr={a.lr}", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0.0", "optim.betas=[0.9,0.999]", "optim.eps=1e-8", "optim.max_grad_norm=1.0",
        "logging.progress_bar=false", "checkpoint.export_hf=false",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the start model and the data, shared by both sides
# ---------------------------------------------------------------------------------------------
def build_qwen_shapes(a: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """Qwen2.5-1.5B's architecture, random weights (bf16 on disk), the real Qwen2.5 tokenizer."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from grpo_fsdp.cli import CONF_DIR

    arch = OmegaConf.load(CONF_DIR / "model" / "qwen2.5-1.5b.yaml").arch
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    out = save_random_qwen2(arch, tok, work / "qwen2.5-1.5b-shapes", a.seed, torch.bfloat16, vocab_size=arch.vocab_size,
                            max_position_embeddings=max(32768, a.max_length), tie_word_embeddings=arch.tie_embeddings)
    return out, {"source": f"Qwen2.5-1.5B shapes (conf/model/qwen2.5-1.5b.yaml), random init, tokenizer {a.tokenizer_dir}"}


def write_pairs(a: argparse.Namespace, model_dir: Path, path: Path) -> dict:
    """The synthetic preference set as JSONL; with --prompt-tokens, solved problems (other rows' chosen solutions)
    prepended to each prompt until it holds about that many tokens of the start model's tokenizer."""
    from transformers import AutoTokenizer

    from grpo_fsdp.cli import compose
    from grpo_fsdp.data.preference_arithmetic import make_arithmetic_pairs

    cfg = compose(["data=preference_arithmetic", f"data.arithmetic.num_train={a.pairs}", f"data.arithmetic.seed={a.seed}"])
    pairs = make_arithmetic_pairs(cfg.data.arithmetic, "train")
    shots = []
    if a.prompt_tokens > 0:
        tok = AutoTokenizer.from_pretrained(model_dir)
        worked = [f"Question: {q.prompt}\nAnswer: {q.chosen}\n\n" for q in pairs]
        per_shot = statistics.mean(len(tok(w, add_special_tokens=False)["input_ids"]) for w in worked[:50])
        k = max(0, round(a.prompt_tokens / per_shot))
        shots = [worked[(i + 1 + j) % len(worked)] for i in range(len(pairs)) for j in range(k)]
        shots = [shots[i * k : (i + 1) * k] for i in range(len(pairs))]
    with open(path, "w") as f:
        for i, pr in enumerate(pairs):
            prompt = "".join(shots[i]) + pr.prompt if shots else pr.prompt
            f.write(json.dumps({"prompt": prompt, "chosen": pr.chosen, "rejected": pr.rejected}) + "\n")
    return {"rows": len(pairs), "shots_per_prompt": len(shots[0]) if shots else 0}


# ---------------------------------------------------------------------------------------------
# the two sides (each in its own process, run by side_by_side.run_child)
# ---------------------------------------------------------------------------------------------
def run_ours(a: argparse.Namespace, model_dir: Path, data: Path, work: Path, tag: str = "") -> dict:
    run_dir = work / f"ours{tag}"
    cmd = [sys.executable, "-m", "grpo_fsdp.train", *our_overrides(a, model_dir, data), *a.ours_extra, f"run_dir={run_dir}"]
    r = run_child(cmd, child_env(a.threads), work / f"ours{tag}.log", watch=run_dir / "metrics.jsonl")
    lt = r.pop("line_times")
    if r["rc"] != 0:
        return {**r, "error": tail(r["log"])}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens = [round(row["perf/tokens_per_s"] * row["perf/step_seconds"]) for row in rows]
    step1 = rows[0]["perf/step_seconds"]
    seconds, steady = lt[-1] - lt[0] + step1, lt[-1] - lt[0]
    ref = REF_LINE.search(Path(r["log"]).read_text())
    cuda = [row[k] for row in rows for k in row if k.endswith("cuda_max_allocated_gib")]
    return {**r, "command": " ".join(cmd), "seconds": seconds, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / seconds,
            "steady_seconds": steady, "steady_tokens_per_s": sum(tokens[1:]) / steady if steady > 0 else None,
            "ref_pass_seconds": float(ref.group(1)) if ref else None, "tokens_per_step": tokens,
            "step_seconds": [step1] + [lt[i] - lt[i - 1] for i in range(1, len(lt))],
            "loss": [row["train/loss"] for row in rows], "cuda_max_allocated_gib": max(cuda) if cuda else None,
            "phase_seconds": {k: sum(row[f"perf/{k}_seconds"] for row in rows) for k in ("forward", "backward", "optimizer")},
            "step_cpu_seconds": sum(row["perf/cpu_seconds"] for row in rows)}


def run_trl(a: argparse.Namespace, model_dir: Path, data: Path, work: Path, tag: str = "") -> dict:
    result = work / f"trl{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "trl", "--result", str(result), "--data", str(data),
           "--model-dir", str(model_dir), "--steps", str(a.steps), "--batch", str(a.batch), "--micro-batch",
           str(a.micro_batch), "--max-length", str(a.max_length), "--max-prompt-length", str(a.max_prompt_length),
           "--beta", str(a.beta), "--lr", str(a.lr), "--seed", str(a.seed), "--threads", str(a.threads),
           "--device", a.device, "--dtype", a.dtype, *(["--trl-online"] if a.trl_online else [])]
    r = run_child(cmd, child_env(a.threads), work / f"trl{tag}.log")
    r.pop("line_times")
    if r["rc"] != 0 or not result.exists():
        return {**r, "error": tail(r["log"])}
    return {**r, "command": " ".join(cmd), **json.loads(result.read_text())}


def trl_side(a: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from grpo_fsdp.cli import compose
    from grpo_fsdp.data.batching import global_batch_indices, split_for_rank
    from grpo_fsdp.data.preference import load_pairs, render_pair, tokenize_pairs

    # the rows ours trains on, rendered by our code, in the order of our micro-batches (recipes/dpo.py)
    cfg = compose(our_overrides(a, a.model_dir, a.data))
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    pairs = load_pairs(cfg.data, cfg.data.train_split)
    samples = tokenize_pairs(pairs, tok, cfg.model.template, cfg.data.instruction, cfg.data.max_prompt_length,
                             cfg.data.max_length, quiet=True)
    if len(samples) != len(pairs):
        raise SystemExit(f"{len(pairs) - len(samples)} pairs filtered or cut by ours: the row order would differ")
    texts = [render_pair(p, tok, cfg.model.template, cfg.data.instruction) for p in pairs]
    lengths = [s.tokens for s in samples]
    order = [i for step in range(a.steps)
             for m in split_for_rank(global_batch_indices(lengths, a.batch, step, a.seed, cfg.train.group_by_length),
                                     lengths, 0, 1, a.micro_batch) for i in m]
    dataset = Dataset.from_dict({k: [texts[i][j] for i in order] for j, k in enumerate(("prompt", "chosen", "rejected"))})

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.logs, self.cpu = [], [], [], []  # cpu: process CPU seconds of each step

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())
            self.cpu.append(-time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())
            self.cpu[-1] += time.process_time()

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    ref_seconds = [0.0]
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            ref_seconds[0] += time.perf_counter() - t

    DPOTrainer._precompute_ref_logps = timed_precompute
    phase = {"forward": 0.0, "forward_backward": 0.0}  # compute_loss (forward + loss) inside training_step
    DPOTrainer.compute_loss = timed(phase, "forward", DPOTrainer.compute_loss)
    DPOTrainer.training_step = timed(phase, "forward_backward", DPOTrainer.training_step)
    cuda, bf16 = a.device == "cuda", a.dtype == "bfloat16"

    def trainer(precompute: bool) -> DPOTrainer:
        args = DPOConfig(
            output_dir=str(a.result.with_suffix("")), max_steps=a.steps, per_device_train_batch_size=a.micro_batch,
            gradient_accumulation_steps=a.batch // a.micro_batch, learning_rate=a.lr, lr_scheduler_type="constant",
            warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
            loss_type=["sigmoid"], beta=a.beta, label_smoothing=0.0, max_length=a.max_length, truncation_mode="keep_start",
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=a.micro_batch, disable_dropout=True,
            bf16=bf16, fp16=False, use_cpu=not cuda, gradient_checkpointing=False, train_sampling_strategy="sequential",
            seed=a.seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
        return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])

    clock, precompute_error = Clock(), None
    try:
        t = trainer(precompute=not a.trl_online)
    except Exception as e:  # noqa: BLE001 - recorded in the table, then TRL runs with its online reference
        precompute_error = f"{type(e).__name__}: {e}"[:500]
        print(f"precompute_ref_log_probs=True failed: {precompute_error}; running with the online reference", flush=True)
        t = trainer(precompute=False)
    rows = t.train_dataset
    mismatched = sum(1 for k, i in enumerate(order) if (rows[k]["prompt_ids"], rows[k]["chosen_ids"], rows[k]["rejected_ids"])
                     != (samples[i].prompt_ids, samples[i].chosen_ids, samples[i].rejected_ids))
    per_row = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    tokens = [sum(per_row[s * a.batch : (s + 1) * a.batch]) for s in range(a.steps)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phase.update(forward=0.0, forward_backward=0.0)  # the precompute's forwards do not count
    t.train()
    b, e = clock.begin, clock.end
    seconds, steady = e[-1] - b[0], e[-1] - e[0]
    phases = {"forward": phase["forward"], "backward": phase["forward_backward"] - phase["forward"],
              "optimizer and the rest": seconds - phase["forward_backward"]}
    a.result.write_text(json.dumps({
        "seconds": seconds, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / seconds, "steady_seconds": steady,
        "steady_tokens_per_s": sum(tokens[1:]) / steady if steady > 0 else None, "tokens_per_step": tokens,
        "step_seconds": [y - x for x, y in zip(b, e)], "ref_pass_seconds": ref_seconds[0] if ref_seconds[0] else None,
        "reference": "online (a frozen copy)" if a.trl_online or precompute_error else "precomputed",
        "precompute_error": precompute_error, "rows_tokenized_differently": mismatched,
        "loss": [x["loss"] for x in clock.logs if "loss" in x], "optimizer_steps": len(e), "phase_seconds": phases,
        "step_cpu_seconds": sum(clock.cpu),
        "cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.side == "trl":
        trl_side(a)
        return 0
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="dpo_vs_trl-"))
    try:
        if a.shapes == "qwen2.5-1.5b" and a.model_dir is None:
            model_dir, start = build_qwen_shapes(a, work)
        else:
            model_dir, start = build_start_model(a, work)
        data = work / "pairs.jsonl"
        written = write_pairs(a, model_dir, data)
        print(f"start model: {start['source']} -> {model_dir}; data: {written['rows']} pairs, "
              f"{written['shots_per_prompt']} solved problems before each prompt", flush=True)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for rep in range(a.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):  # alternate who goes first
                t0 = time.perf_counter()
                r = (run_ours if side == "ours" else run_trl)(a, model_dir, data, work, tag=f"-{rep}")
                runs[side].append(r)
                if "error" in r:
                    print(f"{side} run {rep + 1}: FAILED (exit {r['rc']})\n{r['error']}", flush=True)
                else:
                    print(f"{side} run {rep + 1}: {r['tokens_per_s']:,.0f} tokens/s ({r['tokens']:,} tokens in "
                          f"{r['seconds']:.2f} s; ref pass {r.get('ref_pass_seconds') or 0:.2f} s), peak RSS tree "
                          f"{r['peak_rss_tree_mb']:,.0f} MB, other load {100 * r['other_cpu_share']:.0f}%, "
                          f"process {time.perf_counter() - t0:.0f} s", flush=True)
        res = {side: {"skipped": True} for side in ("ours", "trl")}
        for side, rs in runs.items():
            res[side] = side_summary(rs)
        o, t = res["ours"], res["trl"]
        both = "tokens_per_s" in o and "tokens_per_s" in t
        if a.device == "cuda":
            for r in (o, t):
                r["mfu"] = mfu(model_dir, r.get("tokens_per_s")) if "tokens_per_s" in r else None
        name, slug = machine(a.device)
        ratio = lambda k: o[k] / t[k] if both and o.get(k) and t.get(k) else None
        out = {
            "date": date.today().isoformat(), "machine": name, "platform": platform.platform(),
            "command": " ".join([".venv/bin/python", "benchmarks/dpo_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
            "ratio": ratio("tokens_per_s"), "steady_ratio": ratio("steady_tokens_per_s"),
            "ratio_with_ref_pass": ratio("tokens_per_s_with_ref_pass"), "rss_ratio": ratio("peak_rss_tree_mb"),
            "cpu_ratio": ratio("tokens_per_cpu_s"),
            "tokens_match": both and o["tokens_per_step"] == t["tokens_per_step"],
            "settings": {**{k: v for k, v in vars(a).items() if k not in ("side", "result", "data", "out", "model_dir", "tokenizer_dir")},
                         "prompt_tokens_note": f"{written['shots_per_prompt']} solved problems before each prompt"
                         if written["shots_per_prompt"] else "prompts as generated (no solved problems prepended)"},
            "start_model": start, "versions": versions(), "ours": o, "trl": t,
            "ours_runs": runs.get("ours", []), "trl_runs": runs.get("trl", []),
        }
        out["goal_met"] = bool(out["ratio"] and out["ratio"] >= 2.0 and out["rss_ratio"] is not None and out["rss_ratio"] <= 1.0)
        a.out.mkdir(parents=True, exist_ok=True)
        stem = a.out / f"dpo_vs_trl-{out['date']}-{slug}{a.name_suffix}"
        stem.with_suffix(".json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        write_md(stem.with_suffix(".md"), out)
        if out["ratio"] is not None:
            print(f"ratio ours/TRL {out['ratio']:.2f}x (steps 2..N {out['steady_ratio']:.2f}x); peak RSS ours/TRL "
                  f"{out['rss_ratio']:.2f}")
        print(f"wrote {stem}.json and {stem}.md")
        return 0 if all("tokens_per_s" in res[s] for s in sides) else 1
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
