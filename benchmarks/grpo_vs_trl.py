"""Our GRPO recipe against TRL's `GRPOTrainer`, side by side on one machine: tokens/s and peak RSS.

    .venv/bin/python benchmarks/grpo_vs_trl.py          # 8 prompts x G=8, 64 new tokens, 10 steps, 3 runs a side (~4 min)
    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 20 --max-new-tokens 128 --sft-steps 0 --repeats 1
    .venv/bin/python benchmarks/grpo_vs_trl.py --sides ours --ours-extra hardware.compile=true   # explore our knobs
    .venv/bin/python benchmarks/grpo_vs_trl.py --vocab qwen2.5   # the real 151,665-token vocabulary, tied head

Needs `trl` (measured with trl 1.16.0, which installs beside transformers 5.19 / torch 2.13 without
changing them: `pip install trl==1.16.0` adds only trl and accelerate).

What runs, in one invocation:
  0. the start model, in a temporary directory: the tiny Qwen2 model of conf/model/tiny.yaml after
     `--sft-steps` steps of our SFT on the synthetic arithmetic data (so completions end with EOS
     and rewards vary inside a group, as in a real GRPO run), exported as a Hugging Face directory
     with its tokenizer and chat template; `--sft-steps 0` saves the seeded random init instead
     (every completion then runs to --max-new-tokens and every reward is 0); `--model-dir` uses a
     directory you already have. Both sides load exactly these weights.
     `--vocab qwen2.5` (issue 13) builds the start model with the real Qwen2.5 tokenizer
     (../shared/tokenizers/qwen2.5 beside the repository, 151,665 tokens, its chat template) and
     tied embeddings: the tiny model's layers (conf/model/tiny.yaml) with a 151,665 x 128 head
     shared with the input embedding, seeded random init, then --sft-steps of our SFT from that
     directory (model.path=<init>) as for the default preset.
  1. ours: `python -m grpo_fsdp.train algo=grpo model.path=<dir> ...` in its own process (HFEngine
     rollouts, `rollout.engine=hf` to match TRL's engine kind; reward worker pool, FSDP2 policy with
     the chunked LM head, metrics.jsonl).
  2. TRL: `GRPOTrainer` in its own process (this file with `--side trl`), `use_vllm=False`, so it
     generates with `model.generate` on the training model; the reward is `grpo_fsdp.grading.grade`
     called in-process (ours grades the same function in worker processes with a timeout).

Matched settings: the same weights, prompts (the chat-rendered arithmetic prompts of the default
DataConfig, <= data.max_prompt_length tokens, and the same prompts in the same order in each step:
TRL gets a dataset of exactly our per-step `global_batch_indices` with `shuffle_dataset=False`),
group size G, max completion length, temperature 1.0 (top_p 1, top_k 0), beta 0 (no reference
model), loss "dapo", clip 0.2 / 0.28, group-scaled advantages, one rollout per optimizer step
(TRL: generation batch = prompts x G = per_device_train_batch_size x gradient_accumulation_steps,
steps_per_generation = gradient_accumulation_steps, num_iterations 1, so neither side computes old
log-probs), micro-batch `--micro-batch` sequences (default: the whole rollout in one pass), AdamW
with betas (0.9, 0.95), eps 1e-8, no weight decay, constant learning rate without warmup, grad
clip 1.0, fp32, SDPA attention, no activation checkpointing (TRL's default of True is turned
off), the same thread count (OMP_NUM_THREADS=--threads, both sides).

Not matched (worth knowing when reading the numbers): the random streams differ (the same seed does
not give the same samples), so completion lengths and rewards differ a little per step; TRL's
advantage std is the unbiased one, ours the population std; ours keeps a second, unsharded copy
of the weights in its engine (TRL generates with the training model itself); ours saves a final
checkpoint after the last step (outside the timed window). How each side computes is its own:
ours trains each prompt once per micro-batch with its G completions attending to it
(grpo_fsdp/shared_prefix.py; the same log-probs and gradients as repeating it, tested), decodes
into a preallocated KV cache in inference mode and steps a fused AdamW; TRL repeats the prompt in
each of the G rows and generates with `model.generate`.

Measured:
  runs      each side runs --repeats times (own process each time), the order alternating between
            repeats; the run with the median tokens/s is reported (steps 2..N: the median over runs),
            peak RSS is the maximum over runs, and every run is kept in the JSON.
  time      wall clock from the start of step 1 to the end of step N (process start, imports,
            model load and the final checkpoint excluded). TRL: `on_step_begin` of step 1 to
            `on_step_end` of step N (TrainerCallback, time.perf_counter, CLOCK_MONOTONIC). Ours:
            the parent stats metrics.jsonl every 10 ms and stamps each new line with the same
            clock; time = (line N - line 1) + the length of step 1 (the sum of its perf/*_seconds).
            `steady` excludes step 1 on both sides (line 1 / on_step_end 1 to step N).
  tokens    completion tokens generated in those steps, EOS included (ours: rollout/
            completion_length_mean x prompts x G per step; TRL: the completion_ids handed to the
            reward function). Each is trained on exactly once, so "generated + trained" = this.
  tokens/s  completion tokens / time. ratio = ours / TRL.
  peak RSS  the child's process tree polled with psutil every 50 ms (sum of RSS over the trainer
            and its children: our reward workers count; shared pages are counted once per
            process), and the trainer process alone from os.wait4's ru_maxrss (exact, kernel).
  phases    ours: the per-step perf/{generate,score,logprobs,train,sync}_seconds; TRL: wall time
            inside `_generate_single_turn` (generation) and `_generate_and_score_completions`
            (generation + rewards + advantages), timed by wrapping those two methods.
  load      the share of the machine's CPU time used by processes other than the child and this
            poller during its run (psutil system CPU times minus both): above a few percent the
            machine was shared and the numbers are not comparable. (Polling the tree every 10 ms
            cost about 9% of the 2 cores and slowed our side by ~15%: keep the poller light.)

Writes benchmarks/results/grpo_vs_trl.json (this run) and appends a dated section to
benchmarks/results/grpo_vs_trl.md. Exit code 1 when a side failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from side_by_side import REPO, build_start_model, child_env, run_child, summarise, tail, timed, versions

sys.path.insert(0, str(REPO))  # run from a checkout without installing

DATE = date.today().isoformat()
MACHINE = "2-core CPU, 24 GiB, no GPU"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps = rollouts, each side")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="G completions per prompt (num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="max completion length")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per forward/backward (0: the whole rollout)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of both sides")
    p.add_argument("--sft-steps", type=int, default=60, help="SFT steps for the start model (0: random init)")
    p.add_argument("--model-dir", type=Path, default=None, help="start from this HF directory instead")
    p.add_argument("--vocab", choices=["tiny", "qwen2.5"], default="tiny",
                   help="the start model's tokenizer: the tiny byte-level one, or Qwen2.5's (151,665 tokens, tied head)")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO.parent / "shared" / "tokenizers" / "qwen2.5",
                   help="where --vocab qwen2.5 reads the tokenizer")
    p.add_argument("--sides", default="ours,trl", help="comma list: ours, trl")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating order; the median is reported")
    p.add_argument("--ours-extra", nargs="*", default=[], help="extra overrides for our side only (e.g. hardware.compile=true)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (model, run dirs, logs)")
    # internal: the TRL child
    p.add_argument("--side", choices=["trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 2 and a.side is None:
        p.error(f"--steps {a.steps}: needs at least 2 (the steady figures time steps 2..N)")
    rollout = a.prompts * a.group
    a.micro_batch = a.micro_batch or rollout
    if rollout % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide prompts x group = {rollout}")
    return a


def our_overrides(a: argparse.Namespace, model_dir: Path) -> list[str]:
    """Our recipe's settings; the TRL child composes the same list to pick the same prompts."""
    rollout = a.prompts * a.group
    return [
        "algo=grpo", "rollout.engine=hf", f"model.path={model_dir}", f"train.max_steps={a.steps}",
        f"algo.prompts_per_step={a.prompts}",
        f"algo.group_size={a.group}", f"algo.max_new_tokens={a.max_new_tokens}", "algo.temperature=1.0", "algo.top_p=1.0",
        "algo.top_k=0", "algo.beta=0.0", "algo.loss=dapo", "algo.updates_per_rollout=1", "algo.clip_eps_low=0.2",
        "algo.clip_eps_high=0.28", "algo.advantage_scale=group", f"train.global_batch_size={rollout}",
        f"train.micro_batch_size={a.micro_batch}", f"train.seed={a.seed}", f"optim.lr={a.lr}", "optim.schedule=constant",
        "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.betas=[0.9,0.95]", "optim.eps=1e-8",
        "optim.max_grad_norm=1.0", "logging.progress_bar=false", "checkpoint.export_hf=false",
    ]  # fmt: skip


def run_ours(a: argparse.Namespace, model_dir: Path, work: Path, tag: str = "") -> dict:
    run_dir = work / f"ours{tag}"
    cmd = [sys.executable, "-m", "grpo_fsdp.train", *our_overrides(a, model_dir), *a.ours_extra, f"run_dir={run_dir}"]
    r = run_child(cmd, child_env(a.threads), work / f"ours{tag}.log", watch=run_dir / "metrics.jsonl")
    if r["rc"] != 0:
        return {**r, "error": tail(r["log"])}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lt = r.pop("line_times")
    phases = ("generate", "score", "logprobs", "train", "sync")
    step1 = sum(rows[0][f"perf/{p}_seconds"] for p in phases)
    n = a.prompts * a.group
    tokens = [round(row["rollout/completion_length_mean"] * n) for row in rows]
    seconds = lt[-1] - lt[0] + step1
    steady = lt[-1] - lt[0]
    return {**r, "command": " ".join(cmd), "seconds": seconds, "completion_tokens": sum(tokens),
            "tokens_per_s": sum(tokens) / seconds, "steady_seconds": steady,
            "steady_tokens_per_s": sum(tokens[1:]) / steady if steady > 0 else None,
            "phase_seconds": {p: sum(row[f"perf/{p}_seconds"] for row in rows) for p in phases},
            "step_seconds": [step1] + [lt[i] - lt[i - 1] for i in range(1, len(lt))],
            "completion_tokens_per_step": tokens, "reward_mean": [row["reward/mean"] for row in rows],
            "truncation_rate": [row["rollout/truncation_rate"] for row in rows]}


def run_trl(a: argparse.Namespace, model_dir: Path, work: Path, tag: str = "") -> dict:
    result = work / f"trl{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "trl", "--result", str(result), "--work", str(work),
           "--model-dir", str(model_dir), "--steps", str(a.steps), "--prompts", str(a.prompts), "--group", str(a.group),
           "--max-new-tokens", str(a.max_new_tokens), "--micro-batch", str(a.micro_batch), "--lr", str(a.lr),
           "--seed", str(a.seed), "--threads", str(a.threads)]
    r = run_child(cmd, child_env(a.threads), work / f"trl{tag}.log")
    r.pop("line_times")
    if r["rc"] != 0 or not result.exists():
        return {**r, "error": tail(r["log"])}
    return {**r, "command": " ".join(cmd), **json.loads(result.read_text())}


# ---------------------------------------------------------------------------------------------
# the TRL child
# ---------------------------------------------------------------------------------------------
def trl_side(a: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fsdp.cli import compose
    from grpo_fsdp.data.batching import global_batch_indices
    from grpo_fsdp.data.loading import load_examples
    from grpo_fsdp.data.templates import encode_prompt, render_prompt
    from grpo_fsdp.grading import grade

    # the same prompts, filtered and ordered exactly as recipes/grpo.py does
    cfg = compose(our_overrides(a, a.model_dir))
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples = load_examples(cfg.data, cfg.data.train_split)
    texts = [render_prompt(tok, e.question, cfg.model.template) for e in examples]
    lengths = [len(encode_prompt(tok, t)) for t in texts]
    keep = [i for i, n in enumerate(lengths) if n <= cfg.data.max_prompt_length]
    examples, texts, lengths = [examples[i] for i in keep], [texts[i] for i in keep], [lengths[i] for i in keep]
    order = [i for s in range(a.steps) for i in global_batch_indices(lengths, a.prompts, s, a.seed, False)]
    dataset = Dataset.from_dict({"prompt": [texts[i] for i in order], "answer": [examples[i].answer for i in order]})

    token_counts: list[int] = []

    def correctness(prompts, completions, completion_ids, answer, **_) -> list[float]:
        token_counts.append(sum(len(c) for c in completion_ids))
        return [grade(c, g) for c, g in zip(completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []
            self.logs: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    accum = a.prompts * a.group // a.micro_batch
    args = GRPOConfig(
        output_dir=str(a.result.with_suffix("")), max_steps=a.steps, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=accum, steps_per_generation=accum, num_generations=a.group, num_iterations=1,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
        epsilon=0.2, epsilon_high=0.28, scale_rewards="group", mask_truncated_completions=False,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, use_vllm=False, shuffle_dataset=False, seed=a.seed, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=args, train_dataset=dataset, processing_class=tok,
                          callbacks=[clock])
    phase = {"generate": 0.0, "generate_and_score": 0.0}
    trainer._generate_single_turn = timed(phase, "generate", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed(phase, "generate_and_score", trainer._generate_and_score_completions)
    trainer.train()

    b, e = clock.begin, clock.end
    seconds, steady = e[-1] - b[0], e[-1] - e[0]
    steps = [x for x in clock.logs if "loss" in x]
    a.result.write_text(json.dumps({
        "seconds": seconds, "completion_tokens": sum(token_counts), "tokens_per_s": sum(token_counts) / seconds,
        "steady_seconds": steady, "steady_tokens_per_s": sum(token_counts[1:]) / steady if steady > 0 else None,
        "phase_seconds": {**phase, "score_and_advantages": phase["generate_and_score"] - phase["generate"],
                          "train_and_rest": seconds - phase["generate_and_score"]},
        "step_seconds": [y - x for x, y in zip(b, e)], "completion_tokens_per_step": token_counts,
        "reward_mean": [x.get("reward") for x in steps], "optimizer_steps": len(e), "reward_calls": len(token_counts),
    }))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def write_md(path: Path, res: dict) -> None:
    o, t = res["ours"], res["trl"]
    s = res["settings"]

    def num(x, fmt="{:,.0f}"):
        return "—" if x is None else fmt.format(x)

    def row(name, r):
        if r.get("skipped"):  # --sides left this side out
            return f"| {name} | not run (--sides) | | | | | | |\n"
        if "error" in r:
            return f"| {name} | failed (exit {r['rc']}) | | | | | | |\n"
        return (f"| {name} | {num(r['tokens_per_s'])} | {num(r['steady_tokens_per_s'])} | {num(r['seconds'], '{:.1f}')} | "
                f"{r['completion_tokens']:,} | {num(r['peak_rss_tree_mb'])} | {num(r['ru_maxrss_mb'])} | "
                f"{num(100 * r['other_cpu_share'], '{:.0f}%')} |\n")

    ph_o = ", ".join(f"{k} {v:.1f}" for k, v in o.get("phase_seconds", {}).items())
    ph_t = ", ".join(f"{k} {v:.1f}" for k, v in t.get("phase_seconds", {}).items())
    text = (
        f"\n## {res['date']}: {res['machine']}\n\n"
        f"{s['prompts']} prompts x G={s['group']}, max {s['max_new_tokens']} new tokens, {s['steps']} steps, micro-batch "
        f"{s['micro_batch']}, lr {s['lr']}, {s['threads']} threads; start model: {res['start_model']['source']}. "
        f"torch {res['versions']['torch']}, transformers {res['versions']['transformers']}, trl {res['versions']['trl']}.\n\n"
        "| side | tokens/s | tokens/s (steps 2..N) | seconds | completion tokens | peak RSS tree MB | peak RSS trainer MB | other load |\n"
        "|---|---|---|---|---|---|---|---|\n" + row("ours", o) + row("TRL", t) +
        f"\nratio ours/TRL: **{num(res['ratio'], '{:.2f}')}x** tokens/s (steps 2..N: {num(res['steady_ratio'], '{:.2f}')}x); "
        f"peak RSS ours/TRL (tree): {num(res['rss_ratio'], '{:.2f}')}.\n\n"
        f"Phase seconds, ours: {ph_o}. TRL: {ph_t}.\n\n"
        f"```\n{res['command']}\n```\n"
    )
    if not path.exists():
        text = ("# GRPO: ours vs TRL GRPOTrainer (benchmarks/grpo_vs_trl.py)\n\n"
                "Completion tokens (generated and trained once) per second of training steps, and peak RSS; "
                "see the module docstring for what is timed and matched.\n") + text
    with open(path, "a") as f:
        f.write(text)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.side == "trl":
        trl_side(a)
        return 0
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="grpo_vs_trl-"))
    try:
        model_dir, start = build_start_model(a, work)
        print(f"start model: {start['source']} -> {model_dir}", flush=True)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for rep in range(a.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):  # alternate who goes first
                t0 = time.perf_counter()
                r = (run_ours if side == "ours" else run_trl)(a, model_dir, work, tag=f"-{rep}")
                runs[side].append(r)
                if "error" in r:
                    print(f"{side} run {rep + 1}: FAILED (exit {r['rc']})\n{r['error']}", flush=True)
                else:
                    print(f"{side} run {rep + 1}: {r['tokens_per_s']:,.0f} tokens/s ({r['completion_tokens']:,} tokens in "
                          f"{r['seconds']:.1f} s; steps 2..N {r['steady_tokens_per_s']:,.0f}), peak RSS tree "
                          f"{r['peak_rss_tree_mb']:,.0f} MB, trainer {r['ru_maxrss_mb']:,.0f} MB, other load "
                          f"{100 * r['other_cpu_share']:.0f}%, process {time.perf_counter() - t0:.0f} s", flush=True)
        res = {"ours": {"skipped": True}, "trl": {"skipped": True}}
        for side, rs in runs.items():
            res[side] = summarise(rs)
        o, t = res["ours"], res["trl"]
        ok = all("tokens_per_s" in res[s] for s in sides)
        both = "tokens_per_s" in o and "tokens_per_s" in t
        out = {
            "date": DATE, "run_date": date.today().isoformat(), "machine": MACHINE, "platform": platform.platform(),
            "command": " ".join([".venv/bin/python", "benchmarks/grpo_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
            "ours_tokens_per_s": o.get("tokens_per_s"), "trl_tokens_per_s": t.get("tokens_per_s"),
            "ratio": o["tokens_per_s"] / t["tokens_per_s"] if both else None,
            "steady_ratio": o["steady_tokens_per_s"] / t["steady_tokens_per_s"] if both else None,
            "ours_peak_rss_mb": o.get("peak_rss_tree_mb"), "trl_peak_rss_mb": t.get("peak_rss_tree_mb"),
            "ours_trainer_maxrss_mb": o.get("ru_maxrss_mb"), "trl_trainer_maxrss_mb": t.get("ru_maxrss_mb"),
            "rss_ratio": o["peak_rss_tree_mb"] / t["peak_rss_tree_mb"] if both else None,
            "timing": "wall clock from the start of step 1 to the end of the last step; process start, model load "
                      "and final checkpoint excluded (steady_*: steps 2..N)",
            "settings": {"steps": a.steps, "prompts": a.prompts, "group": a.group, "max_new_tokens": a.max_new_tokens,
                         "micro_batch": a.micro_batch, "lr": a.lr, "seed": a.seed, "threads": a.threads,
                         "temperature": 1.0, "beta": 0.0, "loss_type": "dapo", "engine": "transformers (ours: HFEngine; TRL: use_vllm=False)",
                         "dtype": "float32", "attention": "sdpa", "activation_checkpointing": False,
                         "repeats": a.repeats, "ours_extra_overrides": a.ours_extra, "vocab_preset": a.vocab},
            "start_model": start, "versions": versions(), "ours": o, "trl": t,
            "ours_runs": runs.get("ours", []), "trl_runs": runs.get("trl", []),
        }
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "grpo_vs_trl.json").write_text(json.dumps(out, indent=2) + "\n")
        write_md(a.out / "grpo_vs_trl.md", out)
        if out["ratio"] is not None:
            print(f"ratio ours/TRL {out['ratio']:.2f}x (steps 2..N {out['steady_ratio']:.2f}x); peak RSS ours/TRL {out['rss_ratio']:.2f}")
        print(f"wrote {a.out / 'grpo_vs_trl.json'} and {a.out / 'grpo_vs_trl.md'}")
        return 0 if ok else 1
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
