"""Entropy-selective policy gradient: the policy-gradient loss only on the step's highest-entropy tokens.

Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
Learning for LLM Reasoning" (arXiv 2506.01939): keeping the gradient of only the top 20% highest-entropy
tokens ("forking" tokens) of each batch matches or beats full-token updates. Here:

    algo.entropy_top_quantile = q   keep the ceil(q x n) highest-entropy tokens of the optimizer step
                                    (n = its scored tokens over every micro-batch and every rank), i.e. every
                                    token with H >= tau, tau = the ceil(q n)-th largest entropy; ties at tau
                                    are all kept. 1.0 (the default) is off; 0.2 is the paper's value.
    algo.entropy_threshold = tau    the same mask with a fixed tau (H >= tau); 0 (the default) keeps all.

The entropy H of a token is that of the policy that sampled the step (pi_old, the start of the step's
rollout: recipes/grpo.py computes it in a no-grad pass over the micro-batches with the chunked head,
logprobs.py). On the rollout's first optimizer step it is exactly the current policy's; on later ones
(algo.updates_per_rollout > 1, or several optimizer steps per rollout) the mask stays the sampler's
forking tokens, where the paper recomputes it from the current policy.

The threshold is EXACT, not a histogram estimate: tau is a value of the step's multiset of entropies, the
same on every rank and for any split over ranks and micro-batches. Every rank sends only its own
min(k, n_rank) largest entropies (k = ceil(q n)), since the k largest of the union lie among them:
all-gather of world x k floats (q x n x 4 bytes from each rank, 0.2 x 262,144 tokens = 210 kB).

What the mask changes (algorithms/grpo.py, `grpo_loss(keep=...)`):
  * the surrogate is summed over kept tokens only, and normalised by the KEPT counts: "dapo"/"bnpo"
    divide by the step's kept-token count, "grpo" averages each sequence over its kept tokens (a row with
    none adds 0 but still counts as a sequence), "dr_grpo" keeps its constant;
  * the KL term (algo.beta > 0) stays on every scored token, normalised by the full counts;
  * a dropped token's log-prob then gets a zero gradient (with beta = 0), and the chunked head's backward
    skips it (logprobs.py), so the saving is compute in the LM head, not only a mask. The decoder's
    backward is unchanged (every position still feeds the kept ones through attention).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def keep_count(n: int, top_quantile: float) -> int:
    """How many of n tokens the quantile keeps: ceil(q n), at least 1 when n > 0 (q n rounded to 1e-9 first,
    so that 0.2 x 10 = 2.0000000000000004 keeps 2)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(top_quantile * n, 9))))


def _local_top(values: torch.Tensor, k: int) -> torch.Tensor:
    # values [m] -> [k]: the min(k, m) largest, padded with -inf (which never wins a place among the k largest of n >= k)
    top = values.float().topk(min(k, values.numel())).values
    return torch.cat([top, top.new_full((k - top.numel(),), -math.inf)])


def step_threshold(local_entropies: torch.Tensor, top_quantile: float, device: torch.device) -> float:
    """tau = the ceil(q n)-th largest entropy of the optimizer step over every rank (collective on every rank).

    local_entropies [m]: this rank's scored tokens of the step. Returns +inf when the step has no token.
    """
    local = local_entropies.detach().float().reshape(-1).to(device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    n = torch.tensor(float(local.numel()), dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(n)
    k = keep_count(int(n.item()), top_quantile)
    if k == 0:
        return math.inf
    top = _local_top(local, k)  # [k]
    if distributed:
        parts = [torch.empty_like(top) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, top)
        top = torch.cat(parts)  # [world x k], holds the step's k largest
    return float(top.topk(k).values[-1])


def keep_mask(mask: torch.Tensor, entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """mask [N, T] bool, entropy [N, T] -> the scored tokens with H >= threshold, [N, T] bool."""
    return mask & (entropy >= threshold)


def step_keep_masks(masks: list[torch.Tensor], entropies: list[torch.Tensor], top_quantile: float, threshold: float,
                    device: torch.device) -> tuple[list[torch.Tensor], float]:
    """The keep mask of each micro-batch of one optimizer step, and tau (the same on every rank).

    masks, entropies: [n_i, T_i] per micro-batch (the target masks and pi_old's entropies). With
    top_quantile < 1 tau is `step_threshold` (a collective: call it on every rank); else the fixed `threshold`.
    """
    if top_quantile < 1.0:
        local = torch.cat([e.to(device)[m.to(device)].reshape(-1) for e, m in zip(entropies, masks)]) if masks else \
            torch.zeros(0, device=device)
        threshold = step_threshold(local, top_quantile, device)
    elif threshold <= 0:  # off: every scored token (a peaked distribution's float entropy can be -1e-7, below 0)
        threshold = -math.inf
    return [keep_mask(m.to(device), e.to(device), threshold) for m, e in zip(masks, entropies)], threshold


def mask_sums(mask: torch.Tensor, keep: torch.Tensor, entropy: torch.Tensor) -> dict[str, float]:
    """This micro-batch's share of the logged statistics: scored and kept tokens, entropy sums of kept and dropped."""
    drop = mask & ~keep
    e = entropy.detach().float()
    return {"scored": float(mask.sum()), "kept": float(keep.sum()),
            "kept_entropy": float(torch.where(keep, e, 0.0).sum()), "dropped_entropy": float(torch.where(drop, e, 0.0).sum())}


def mask_metrics(total: dict[str, float], thresholds: list[float]) -> dict[str, float]:
    """The logged dict from the step's `mask_sums` (summed over micro-batches and ranks, keys `emask_<name>`) and
    the thresholds of its optimizer steps (the same on every rank): their mean, the kept share of scored tokens, and
    the mean entropy of kept and of dropped tokens."""
    scored, kept = total["emask_scored"], total["emask_kept"]
    return {"train/entropy_threshold": sum(thresholds) / len(thresholds) if thresholds else 0.0,
            "train/entropy_kept_frac": kept / max(scored, 1.0),
            "train/entropy_kept_mean": total["emask_kept_entropy"] / max(kept, 1.0),
            "train/entropy_dropped_mean": total["emask_dropped_entropy"] / max(scored - kept, 1.0)}
