"""`make demo ARGS="pipeline=dpo"`: the demo's SFT model, then DPO on its own graded samples, before/after.

    python -m grpo_fsdp.demo pipeline=dpo [--out=DIR] [overrides for every stage...] [sft:<override>] [dpo:<override>]

1. SFT: the same stage as `make demo` (same settings, same `<out>/sft`, reused when already trained).
2. On-policy pairs (`data/onpolicy_pairs.py`): `PAIRS.k` samples of each of the 600 training questions from the SFT
   model at temperature 1, graded by the reward's grader; chosen = a correct sample (the gold worked solution when
   none is), rejected = a wrong one; questions without a wrong sample give no pair. Written to
   `<out>/dpo-pairs/train.jsonl`, reused while the SFT model, the settings and the questions are the same.
3. DPO from the SFT export on those pairs (`data=preference data.path=...`, rendered exactly as the SFT and GRPO
   prompts), in `<out>/dpo`.
4. On the same 500 held-out problems: greedy answer accuracy of both models (`accuracy.held_out_accuracy`, the
   paired bootstrap's 95% interval for the gain, as for GRPO); on the 500 synthetic held-out pairs of
   `data=preference_arithmetic` (chosen = the worked correct solution, rejected = the same chain with one wrong
   step): how often each model gives the chosen solution the higher summed log-prob (`sft_pair_accuracy`,
   `dpo_pair_accuracy`), and DPO's implicit-reward accuracy against the SFT reference (`reward_accuracy`,
   `reward_margin`, `recipes/dpo_eval.py`; before the first update the policy is the reference and every reward is
   0, so it starts at 0: ties do not count). The pairs are scored by a plain padded transformers forward of the two
   exports, not by the trainer's shared-prefix path. A table, and `<out>/summary-dpo.json` (`pipeline`, `seed`,
   `sft_accuracy`, `dpo_accuracy`, `gain_points`, `gain_ci95`, the pair metrics, `pairs` and `prompts_skipped` of
   step 2, mean lengths, seconds per stage and in all).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from grpo_fsdp.data.onpolicy_pairs import SampleSettings

# Measured on the demo's SFT models (benchmarks/results/demo_dpo-2026-11-30-amd-epyc-2-cores.md). With half the SFT
# solutions careless estimates, DPO on the synthetic pairs (chosen: worked, rejected: one wrong step) lost 9.4 points
# on seed 0: it never shows an estimate as rejected. On the SFT model's own graded samples (8 per question, one pair
# each) it sees them: RPO (sigmoid, beta 1, the chosen side's NLL) gained +27.2, +6.2, +46.8 on seeds 0-2. Seed 1 gets
# few sums right (GRPO gains +4.0 there): lr 1e-4 gave +6.2 on it, 5e-5 +5.4, and 80 steps, sft_weight 2, two
# pairs per question or the gold solution always chosen did no better (+5.2 to +6.2).
PAIRS = SampleSettings(k=8, per_prompt=1)  # the seed is train.seed
DPO = ["algo=dpo", "data=preference", "data.max_prompt_length=128", "data.max_length=192", "train.max_steps=40",
       "train.global_batch_size=32", "train.micro_batch_size=16", "optim.lr=1e-4", "optim.warmup_steps=2",
       "optim.schedule=constant", "algo.loss=sigmoid", "algo.beta=1", "algo.sft_weight=1"]


def pair_scores(model_dir: Path, samples, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """[N, 4] fp32: summed log-probs of each pair's chosen and rejected completion under the Hugging Face model in
    `model_dir`, and their token counts (the columns of recipes/dpo_eval.score), from padded rows."""
    from transformers import AutoModelForCausalLM

    from grpo_fsdp.algorithms.dpo import sequence_logps
    from grpo_fsdp.recipes.dpo_pairs import pad_pairs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(samples), batch_size):
            b = pad_pairs(samples[lo : lo + batch_size], pad_id)  # rows 2i: prompt + chosen, 2i+1: prompt + rejected
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)  # [2n, L-1]
            sums, counts = sequence_logps(logp, b["loss_mask"][:, 1:])  # token t+1 scored from position t
            out.append(torch.stack([sums[0::2], sums[1::2], counts[0::2], counts[1::2]], dim=1))
    return torch.cat(out)


def pair_metrics(sft: torch.Tensor, dpo: torch.Tensor, loss: str, beta: float, label_smoothing: float) -> dict[str, float]:
    """`pair_scores` of the SFT (the reference) and DPO models on the same pairs -> the summary's pair metrics."""
    from grpo_fsdp.recipes.dpo_eval import reward_metrics

    reward = reward_metrics(dpo, sft[:, 0], sft[:, 1], loss, beta, label_smoothing)
    return {"sft_pair_accuracy": (sft[:, 0] > sft[:, 1]).sum().item() / len(sft),
            "dpo_pair_accuracy": (dpo[:, 0] > dpo[:, 1]).sum().item() / len(dpo),
            "reward_accuracy": reward["eval/reward_accuracy"], "reward_margin": reward["eval/rewards_margin"]}


def _table(rows: list[tuple[str, float, float]], problems: int, pairs: int) -> str:
    lines = ["stage   held-out accuracy   chosen ranked first", "------  -----------------   -------------------"]
    lines += [f"{name:<6}  {acc:6.1%} of {problems:<6}    {pref:6.1%} of {pairs}" for name, acc, pref in rows]
    return "\n".join(lines)


def run_dpo_demo(out: Path, task: list[str], model: list[str], both: list[str], dpo_only: list[str], began: float,
                 sft_done: float) -> int:
    """Stages 2 to 4 of the module docstring, after `demo.py` has trained (or found) `<out>/sft`."""
    from grpo_fsdp.accuracy import held_out_accuracy
    from grpo_fsdp.bootstrap import paired_bootstrap_ci
    from grpo_fsdp.cli import UserError, compose
    from grpo_fsdp.data.loading import load_examples
    from grpo_fsdp.data.onpolicy_pairs import ensure_pairs
    from grpo_fsdp.data.preference import load_pairs, tokenize_pairs
    from grpo_fsdp.data.preference_arithmetic import parse_expression, worked_chain
    from grpo_fsdp.demo import run_stage
    from grpo_fsdp.models import load_tokenizer

    sft_dir, dpo_dir = out / "sft", out / "dpo"
    base = compose([*task, *both])  # the demo's task (as for GRPO)
    train = load_examples(base.data, base.data.train_split)
    gold = [worked_chain(*parse_expression(e.meta["expression"]))[0] for e in train]  # worked, even where SFT estimated
    pairs_path, counts = ensure_pairs(out / "dpo-pairs", sft_dir / "hf", train, gold, base.model.template,
                                      base.data.instruction, replace(PAIRS, seed=base.train.seed))
    print(f"demo: {counts['pairs']} on-policy pairs from {counts['samples']} samples of the SFT model "
          f"({counts['samples_correct']} correct); {counts['prompts_skipped']} questions without a wrong sample skipped, "
          f"{counts['gold_chosen']} pairs with the gold solution as chosen; in {pairs_path}")
    if not counts["pairs"]:
        raise UserError(f"demo: no on-policy pair: none of the SFT model's {counts['samples']} samples is wrong, so DPO "
                        "has nothing to push down; the SFT model needs no DPO (or sample more: PAIRS in demo_dpo.py)")
    pairs_done = time.perf_counter()
    stage = [*task, *model, *DPO, f"data.path={pairs_path}", f"model.path={sft_dir / 'hf'}"]
    code = run_stage("DPO", dpo_dir, [*stage, *both, *dpo_only])
    if code:
        return code
    dpo_done = time.perf_counter()

    cfg = compose([*stage, *both, *dpo_only])  # the DPO stage's
    synthetic = compose([*task, *model, "data=preference_arithmetic", *both]).data  # the held-out pairs
    held_out = load_examples(base.data, base.data.test_split)
    sft_acc = held_out_accuracy(sft_dir / "hf", held_out, cfg.model.template, instruction=cfg.data.instruction)
    dpo_acc = held_out_accuracy(dpo_dir / "hf", held_out, cfg.model.template, instruction=cfg.data.instruction)
    lo, hi = paired_bootstrap_ci(sft_acc.per_problem, dpo_acc.per_problem)
    tokenizer = load_tokenizer(cfg.model)
    pairs = tokenize_pairs(load_pairs(synthetic, synthetic.test_split), tokenizer, cfg.model.template, synthetic.instruction,
                           synthetic.max_prompt_length, synthetic.max_length)
    scores = [pair_scores(d / "hf", pairs, tokenizer.pad_token_id) for d in (sft_dir, dpo_dir)]
    a = cfg.algo
    pm = pair_metrics(*scores, a.loss, a.beta, a.label_smoothing)
    done = time.perf_counter()
    summary = {
        "pipeline": "dpo",
        "seed": base.train.seed,
        "sft_accuracy": sft_acc.rate,
        "dpo_accuracy": dpo_acc.rate,
        "gain_points": 100 * (dpo_acc.rate - sft_acc.rate),
        "gain_ci95": [lo, hi],  # paired bootstrap over the held-out problems, points (bootstrap.py)
        "held_out_problems": len(held_out),
        "held_out_pairs": len(pairs),
        **pm,
        "pairs": counts["pairs"],  # on-policy training pairs (data/onpolicy_pairs.py)
        "prompts_skipped": counts["prompts_skipped"],  # training questions without a wrong sample
        "pairs_gold_chosen": counts["gold_chosen"],  # pairs whose chosen side is the gold solution (no correct sample)
        "sft_mean_length": sft_acc.mean_length,
        "dpo_mean_length": dpo_acc.mean_length,
        "dpo_settings": {"loss": a.loss, "beta": a.beta, "lr": cfg.optim.lr, "steps": cfg.train.max_steps,
                         "global_batch_size": cfg.train.global_batch_size, "sft_weight": a.sft_weight,
                         "samples_per_prompt": PAIRS.k, "pairs_per_prompt": PAIRS.per_prompt},
        "sft_seconds": sft_done - began,
        "pairs_seconds": pairs_done - sft_done,
        "dpo_seconds": dpo_done - pairs_done,
        "eval_seconds": done - dpo_done,
        "seconds": done - began,
    }
    path = out / "summary-dpo.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(_table([("SFT", sft_acc.rate, pm["sft_pair_accuracy"]), ("DPO", dpo_acc.rate, pm["dpo_pair_accuracy"])],
                 len(held_out), len(pairs)))
    print(f"DPO implicit-reward accuracy on the held-out pairs {pm['reward_accuracy']:.1%} (0% before: policy = reference), "
          f"margin {pm['reward_margin']:+.3f}")
    print(f"DPO {summary['gain_points']:+.1f} points over SFT (95% interval {lo:+.1f} to {hi:+.1f}) in {summary['seconds']:.0f} s; "
          f"summary in {path}")
    return 0
