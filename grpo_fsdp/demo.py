"""`make demo`: the main job on the embedded default, on a laptop CPU: SFT, then GRPO.

    python -m grpo_fsdp.demo [overrides for both stages...]

1. SFT: a tiny Qwen2-architecture model, built from scratch, learns synthetic arithmetic from
   worked solutions (`outputs/demo/sft`).
2. GRPO from that checkpoint, rewarded by math-verify on the final `\\boxed{}` answer
   (`outputs/demo/grpo`).
3. Greedy accuracy of both on the same held-out problems, a before/after table, and
   `outputs/demo/summary.json` (`sft_accuracy`, `grpo_accuracy`, `seconds`, ...).

Each stage resumes if interrupted (`checkpoint.resume=auto`). Extra arguments are Hydra overrides
applied to both stages, e.g. `make demo ARGS="data.arithmetic.max_operand=9"`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from grpo_fsdp.cli import compose, run_main
from grpo_fsdp.train import main

OUT = Path("outputs/demo")
# The task: sums of 2-3 digits. No instruction after the question: the byte-level tiny model learns
# to copy the operands much sooner when they sit right before the answer (measured: 33% vs 10%
# greedy accuracy after the same SFT budget).
TASK = ["data.arithmetic.max_operand=9", "data.arithmetic.ops=[+]", "data.arithmetic.num_train=900",
        "data.arithmetic.num_test=200", "data.instruction=''"]
SFT = ["algo=sft", "train.max_steps=600", "train.global_batch_size=32", "train.micro_batch_size=16"]
# GRPO moves a tiny model fast: a constant 5e-5 (60x below SFT's peak) raised held-out accuracy in
# our sweeps, 2e-4 and above lowered it.
# The transformers engine: vLLM (`rollout.engine=vllm`) works too but spends ~40 s compiling on a
# CPU to generate this tiny model's rollouts about as fast.
GRPO = ["algo=grpo", "rollout.engine=hf", "train.max_steps=50", "algo.prompts_per_step=16", "algo.group_size=8", "algo.max_new_tokens=64",
        "train.global_batch_size=128", "train.micro_batch_size=32", "optim.lr=5e-5", "optim.warmup_steps=2",
        "optim.schedule=constant", "algo.reward_workers=1"]
HELD_OUT = 200


def _table(rows: list[tuple[str, float, int]]) -> str:
    lines = ["stage   held-out accuracy", "------  -----------------"]
    lines += [f"{name:<6}  {rate:6.1%} of {n}" for name, rate, n in rows]
    return "\n".join(lines)


def demo(args: list[str]) -> int:
    from grpo_fsdp.accuracy import held_out_accuracy
    from grpo_fsdp.data.loading import load_examples

    began = time.perf_counter()
    sft_dir, grpo_dir = OUT / "sft", OUT / "grpo"
    code = main([*TASK, *SFT, f"run_dir={sft_dir}", "checkpoint.resume=auto", *args])
    if code:
        return code
    code = main([*TASK, *GRPO, f"model.path={sft_dir / 'hf'}", f"run_dir={grpo_dir}", "checkpoint.resume=auto", *args])
    if code:
        return code

    cfg = compose([*TASK, *args])
    held_out = load_examples(cfg.data, cfg.data.test_split)[:HELD_OUT]
    sft_acc = held_out_accuracy(sft_dir / "hf", held_out, cfg.model.template, instruction=cfg.data.instruction)
    grpo_acc = held_out_accuracy(grpo_dir / "hf", held_out, cfg.model.template, instruction=cfg.data.instruction)
    seconds = time.perf_counter() - began
    summary = {
        "sft_accuracy": sft_acc.rate,
        "grpo_accuracy": grpo_acc.rate,
        "gain_points": 100 * (grpo_acc.rate - sft_acc.rate),
        "held_out_problems": len(held_out),
        "sft_mean_length": sft_acc.mean_length,
        "grpo_mean_length": grpo_acc.mean_length,
        "seconds": seconds,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(_table([("SFT", sft_acc.rate, len(held_out)), ("GRPO", grpo_acc.rate, len(held_out))]))
    print(f"GRPO {summary['gain_points']:+.1f} points over SFT in {seconds:.0f} s; summary in {OUT / 'summary.json'}")
    return 0


if __name__ == "__main__":
    run_main(demo, sys.argv[1:])
