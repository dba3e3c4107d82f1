"""One optimizer step of GRPO over a rollout's micro-batches, and the no-grad passes it needs (pi_old, reference).

`recipes/grpo.py` runs the step loop (rollouts, rewards, advantages, sync, logging); what happens between a
rollout's micro-batches and the optimizer is here: the step's all-reduced token counts, the entropy mask's
threshold, the loss per micro-batch (blocked: `algorithms/grpo.grpo_loss` on the dense log-probs; fused: the
same loss built inside the LM head, `algorithms/token_loss.TokenLoss`), backward, clip, AdamW and the schedule.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from grpo_fsdp import distributed
from grpo_fsdp.algorithms.entropy_mask import mask_sums, step_keep_masks
from grpo_fsdp.algorithms.grpo import count_contributions, grpo_loss
from grpo_fsdp.algorithms.rollout_correction import corrected_tokens, correction_weights, mismatch_sums
from grpo_fsdp.algorithms.surrogates import loss_parts
from grpo_fsdp.algorithms.token_loss import TokenLoss
from grpo_fsdp.config import GRPOConfig
from grpo_fsdp.recipes.rollout_batch import to_device


def score_logprobs(model, batches, device, temperature: float) -> list[torch.Tensor]:
    """Per-token log-probs [n, L-1] of each micro-batch under `model` (old policy or reference), no grad."""
    with torch.no_grad():
        return [model(**to_device(b["inputs"], device), target_mask=b["target_mask"].to(device), temperature=temperature)[0]
                for b in batches]


def old_policy_pass(policy, steps, device, temperature: float, need_old: bool, need_entropy: bool):
    """pi_old's log-probs (a rollout of several optimizer steps) and entropies (the entropy mask) of every micro-batch,
    in one no-grad pass -> (olds | None, ents | None), each [optimizer step][micro-batch] -> [n, L-1]."""
    if not (need_old or need_entropy):
        return None, None
    with torch.no_grad():
        out = [[policy(**to_device(b["inputs"], device), target_mask=b["target_mask"].to(device), with_entropy=need_entropy,
                       temperature=temperature) for b in s] for s in steps]
    return ([[lp for lp, _ in s] for s in out] if need_old else None), ([[e for _, e in s] for s in out] if need_entropy else None)


def optimizer_step(policy, optimizer, scheduler, batches, olds, refs, g: GRPOConfig, max_grad_norm: float, device,
                   temperature: float, ents=None, fused: bool = False) -> dict[str, float]:
    """Forward/backward every micro-batch of one optimizer step, clip, step. Returns this rank's sums.

    A step that scores no token on any rank (every group dropped by filter_zero_variance, every completion
    cut under mask_truncated) is skipped, identically on every rank since they decide on the all-reduced
    count: no forward or backward (FSDP's collectives run on all ranks or on none), no AdamW step (it would
    move the weights on stale momentum) and no scheduler step: the LR schedule counts applied updates, as
    AdamW's own step count does, so warmup is never spent on skipped ones (cost: a run with skipped updates
    ends before the schedule's last value). It reports loss 0 and grad norm 0 (nothing is scored, the
    gradient is zero) and skipped = 1, logged as train/skipped_updates.

    The engine's log-probs of the sampled tokens (`engine_logp` of each micro-batch) are compared with the
    trainer's old ones (mismatch sums, logged as rollout/mismatch_*) and correct the surrogate by
    algo.rollout_correction (algorithms/rollout_correction.py); the correction leaves the counts alone.

    The entropy mask (algo.entropy_top_quantile or algo.entropy_threshold, algorithms/entropy_mask.py): tau over
    the step's scored tokens on every rank, the surrogate on the kept tokens over their all-reduced count, the KL on
    all of them. The entropies are pi_old's: `ents`, from `old_policy_pass`, when a rank has several micro-batches
    per optimizer step; with one, its own forward's (the same values on a rollout's first optimizer step; later
    ones, under updates_per_rollout > 1 or several optimizer steps per rollout, always get `ents`).
    """
    local = defaultdict(int)
    for b in batches:
        for k, v in count_contributions(b["target_mask"]).items():
            local[k] += int(v)
    norm = {k: distributed.all_reduce_sum(v, device) for k, v in local.items()}  # the step's global counts
    norm["max_completion_length"] = g.max_new_tokens
    surrogate, aggregation = loss_parts(g.loss)
    cap = g.rollout_correction_cap
    sums = defaultdict(float, skipped=0)
    if norm["global_tokens"] == 0:  # the same on every rank: all skip together
        sums.update(skipped=1, grad_norm=0.0)
        return sums
    keeps = keep_norm = None

    def entropy_mask(ents):  # one threshold for the step on every rank (a collective), the kept tokens' global count
        keeps, sums["entropy_threshold"] = step_keep_masks([b["target_mask"] for b in batches], ents, g.entropy_top_quantile,
                                                           g.entropy_threshold, device)
        kept = distributed.all_reduce_sum(sum(int(k.sum()) for k in keeps), device)
        return keeps, {**norm, "global_tokens": max(kept, 1.0)}  # no kept token: the surrogate's sum is 0 anyway

    masking = g.entropy_top_quantile < 1 or g.entropy_threshold > 0
    if ents is not None:
        keeps, keep_norm = entropy_mask(ents)
    elif masking and len(batches) > 1:
        raise ValueError("the entropy mask over several micro-batches needs pi_old's entropies (old_policy_pass)")
    settings = {"eps_low": g.clip_eps_low, "eps_high": g.clip_eps_high, "beta": g.beta, "aggregation": aggregation,
                "normalisers": norm}
    for i, b in enumerate(batches):
        tm, adv = b["target_mask"].to(device), b["adv"].to(device)
        ref = None if refs is None else refs[i]
        engine = None if b.get("engine_logp") is None else b["engine_logp"].to(device)  # None: a rollout without them
        inputs = dict(**to_device(b["inputs"], device), target_mask=tm, with_entropy=True, temperature=temperature)
        if fused:
            token_loss = TokenLoss(tm, adv, None if olds is None else olds[i], ref, engine, surrogate=surrogate,
                                   correction=g.rollout_correction, correction_cap=cap, **settings)
            logp, ent, loss = policy(**inputs, token_loss=token_loss)
        else:
            logp, ent = policy(**inputs)
        if masking and keeps is None:  # one micro-batch per rank: its own forward's entropies (pi_old's), no extra pass
            ents = [ent.detach()]
            keeps, keep_norm = entropy_mask(ents)
        old = logp.detach() if olds is None else olds[i]
        weights = correction_weights(g.rollout_correction, old, engine, tm, cap, g.rollout_correction_level)
        with torch.set_grad_enabled(not fused):  # fused: the loss exists already; this gives its statistics
            blocked_loss, st = grpo_loss(logp, old, ref, adv, tm, importance_level=g.importance_level, surrogate=surrogate,
                                         token_weights=weights, keep=None if keeps is None else keeps[i],
                                         keep_normalisers=keep_norm, **settings)
        if not fused:
            loss = blocked_loss
        loss.backward()
        if keeps is not None:
            for k, v in mask_sums(tm, keeps[i], ents[i]).items():
                sums[f"emask_{k}"] += v
        if engine is not None:
            mismatch = mismatch_sums(old, engine, tm, cap)
            sums["mismatch_abs_max"] = max(sums["mismatch_abs_max"], float(mismatch.pop("abs_max")))
            for k, v in mismatch.items():  # kl, abs, outside, tokens: sums
                sums[f"mismatch_{k}"] += float(v)
            sums["corrected"] += float(corrected_tokens(g.rollout_correction, weights, tm, cap))
        n_tok = float(tm.sum())
        sums["loss"] += loss.item()
        sums["tokens"] += n_tok
        sums["entropy"] += float((ent.detach() * tm).sum())
        sums["clip_low"] += float(st["clip_frac_low"]) * n_tok
        sums["clip_high"] += float(st["clip_frac_high"]) * n_tok
        sums["kl"] += float(st.get("kl_mean", torch.tensor(0.0))) * n_tok
    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = float(distributed.full_tensor(gn))
    return sums
