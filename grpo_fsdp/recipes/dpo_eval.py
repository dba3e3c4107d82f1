"""Held-out preference pairs for DPO (`algo.eval_pairs` > 0): implicit-reward accuracy and margin at the end of a run.

The first `algo.eval_pairs` pairs of `data.test_split` are tokenized like the training pairs. Their reference
log-probs are taken before the first update (cached like the training set's, `dpo_reference.py`, or from the
frozen copy with `algo.precompute_ref=false`); after the last step the policy scores them and the final step logs

    eval/reward_accuracy   share of pairs with beta x_c > beta x_r (rewards as in algorithms/dpo.py)
    eval/rewards_margin    mean beta (x_c - x_r)
    eval/loss              mean per-pair loss of algo.loss

Before training the policy is the reference, every reward is 0: accuracy 0 (ties do not count) and margin 0.
Every rank scores every held-out pair (the same forwards in the same order, as FSDP requires); the set is small.
"""

from __future__ import annotations

import torch

from grpo_fsdp.algorithms.dpo import pair_losses
from grpo_fsdp.data.preference import PreferenceSample, load_pairs, tokenize_pairs
from grpo_fsdp.recipes.dpo_pairs import layout_pairs, pair_logps


def held_out_pairs(cfg, tokenizer, quiet: bool) -> list[PreferenceSample]:
    pairs = load_pairs(cfg.data, cfg.data.test_split, limit=cfg.algo.eval_pairs)
    return tokenize_pairs(pairs, tokenizer, cfg.model.template, cfg.data.instruction, cfg.data.max_prompt_length,
                          cfg.data.max_length, quiet=quiet)


def score(model, samples: list[PreferenceSample], micro: int, pad_id: int, shared_prefix: bool, device) -> torch.Tensor:
    """[N, 4] fp32 on the CPU: summed log-probs of chosen and rejected, and their token counts, of every pair."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(samples), micro):
            lp = pair_logps(model, layout_pairs(samples[lo : lo + micro], pad_id, shared_prefix), device)
            out.append(torch.stack([lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len], dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def reward_metrics(policy_scores: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, loss: str, beta: float,
                   label_smoothing: float) -> dict[str, float]:
    """policy_scores [N, 4] (`score`), ref_* [N] -> the eval/ metrics of the module docstring."""
    pc, pr, lc, lr = policy_scores.unbind(1)
    per_pair, rew_c, rew_r = pair_losses(loss, pc, pr, ref_chosen, ref_rejected, lc, lr, beta, label_smoothing)
    return {"eval/reward_accuracy": (rew_c > rew_r).float().mean().item(),
            "eval/rewards_margin": (rew_c - rew_r).mean().item(),
            "eval/loss": per_pair.mean().item()}
