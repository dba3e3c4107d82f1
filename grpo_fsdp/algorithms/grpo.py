"""GRPO maths: group advantages, the clipped surrogate, the k3 KL penalty and loss aggregation.

Pure functions of tensors, composed by `grpo_loss`. Its ratio and surrogate variants (GSPO's sequence
ratio, CISPO) are in surrogates.py; the engine/trainer mismatch correction (TIS, MIS) in
rollout_correction.py; the entropy-selective mask of the surrogate (arXiv 2506.01939) in entropy_mask.py.
Shapes: N completions in a micro-batch, T completion positions (right-padded), `mask [N, T]` bool marks
the scored tokens. Rewards and advantages are laid out group-contiguous: completions `b*G .. b*G+G-1` answer prompt b.

Sources:
  GRPO          Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300), eq. 3 and sec. 4.1.2.
  PPO clip      Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  k3 KL         Schulman 2020, "Approximating KL Divergence" (blog note).
  DAPO          Yu et al. 2025 (arXiv 2503.14476): clip-higher, token-level loss, overlong filtering.
  Dr. GRPO      Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv 2503.20783).
  batch std     Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning" (Lite PPO);
                Hu 2025, "REINFORCE++".

Where this departs from the papers (and from common implementations):
  * Group std is the POPULATION std (divide by G, `unbiased=False`); DeepSeekMath does not say,
    TRL and verl use torch.std's Bessel-corrected default. Why: the advantage standardises the G
    rewards actually observed, so with the population std every non-degenerate group has mean 0
    and mean square exactly 1 whatever G is; Bessel's correction shrinks advantages by
    sqrt((G-1)/G) (0.71 at G=2, 0.94 at G=8), making the gradient scale depend on G, and does not
    even make the *std* unbiased (only the variance). Cost: our advantages are sqrt(G/(G-1))
    times TRL's (1.069 at G=8); compare losses with peers after that factor.
  * Groups whose rewards are all equal get advantage exactly 0 in every scale mode, set
    explicitly: the float mean of equal values need not equal them, and (r - mean) / eps would
    turn a 1e-8 rounding error into a 1e-2 advantage.
  * The default aggregation is DAPO's token-level sum / token count, not DeepSeekMath's
    sequence-mean of token means (available as "grpo"). Every aggregation divides by counts
    over the WHOLE optimizer step (all micro-batches, all ranks), all-reduced by the caller, so
    the gradient does not depend on how the step is split (DESIGN.md, "Loss normalisation").
  * A completion with no scored token (masked by `mask_truncated`, or in a group dropped by
    `filter_zero_variance`) adds nothing to the token count but still counts as a sequence
    (`count_contributions`): DeepSeekMath's objective averages over all G outputs of each group
    (1/G sum_i), and Dr. GRPO divides by a constant, generation budget x number of sequences, so
    masking a row must not change either denominator; the masked row contributes 0 to the sum.
    "dapo"/"bnpo" divide by scored tokens, so there a masked row is simply absent. (TRL's "grpo"
    and "dr_grpo" losses also count masked rows: they use the batch's row count.) A step with no
    scored token at all is not an update: the recipe skips it (`recipes/grpo_update.py`, `optimizer_step`).
  * The KL penalty is added per token before aggregation (DeepSeekMath eq. 3), not to the reward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from grpo_fsdp.algorithms.surrogates import RATIOS, SURROGATES, ppo_clip, token_ratio

# ---------------------------------------------------------------- advantages


def _float(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [B*G] -> bool [B]: True where all G rewards of the group are equal (no learning signal)."""
    groups = rewards.reshape(-1, group_size)  # [B, G]
    return groups.amax(dim=1) == groups.amin(dim=1)


def _centred(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    # rewards [B*G] -> r - group mean, [B, G]; exactly 0 in zero-variance groups (see docstring)
    groups = _float(rewards).reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return centred.masked_fill(zero_variance_groups(rewards, group_size).unsqueeze(1), 0.0)


def _divisor_group(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """DeepSeekMath: each group's own (population) std + eps -> [B, 1]."""
    return _float(rewards).reshape(-1, group_size).std(dim=1, unbiased=False, keepdim=True) + eps


def _divisor_batch(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Lite PPO: group mean, but the (population) std of all rewards in the batch + eps -> [1, 1].

    The batch is what the caller passes: give it the whole step's rewards (all-gathered over
    ranks, a few floats) for a step-level std. REINFORCE++-baseline instead takes the std of the
    group-centred values; that would be another small function.
    """
    return _float(rewards).std(unbiased=False).reshape(1, 1) + eps


def _divisor_none(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Dr. GRPO: no std division (it up-weights too-easy and too-hard prompts) -> 1, and no eps."""
    return torch.ones(1, 1, dtype=_float(rewards).dtype, device=rewards.device)


# scale name -> (rewards [B*G], G, eps) -> divisor broadcastable to [B, G]
ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "group": _divisor_group,
    "batch": _divisor_batch,
    "none": _divisor_none,
}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards [B*G] -> advantages [B*G] (fp32 or wider): (r - group mean) / divisor.

    divisor by `scale`: "group" std of the group + eps, "batch" std of the batch + eps, "none" 1.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r} is not one of {sorted(ADVANTAGE_SCALES)}")
    centred = _centred(rewards, group_size)  # [B, G]
    return (centred / ADVANTAGE_SCALES[scale](rewards, group_size, eps)).reshape(-1)


# ---------------------------------------------------------------- per-token terms


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp. [.., T] -> [.., T].

    Unbiased for the KL under samples from pi, and >= 0 (since e^d >= 1 + d). expm1 keeps the
    precision near d = 0, where nearly all tokens sit. Its gradient w.r.t. logp is 1 - exp(d).
    """
    d = ref_logp.detach() - logp
    return torch.expm1(d) - d


def clip_regions(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens where the clipped branch is active (zero gradient) -> (low [N, T], high [N, T]) bool.

    high: ratio > 1 + eps_high with A > 0; low: ratio < 1 - eps_low with A < 0.
    """
    _, low, high = ppo_clip(token_ratio(logp.detach(), old_logp), advantages, eps_low, eps_high)
    return low, high


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with DAPO's decoupled bounds (clip-higher).

    logp, old_logp [N, T], advantages [N] -> (per_token_loss [N, T], clipped_mask [N, T] bool).
    loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), ratio = exp(logp - old_logp).
    Padding positions are not masked here; the aggregation does that. (`surrogates.ppo_clip` of the token
    ratio; `grpo_loss` also takes GSPO's sequence ratio and CISPO, see surrogates.py.)
    """
    per_token, low, high = ppo_clip(token_ratio(logp, old_logp), advantages, eps_low, eps_high)
    return per_token, low | high


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: drop every token of completions cut at the length limit.

    mask [N, T] bool, truncated [N] bool -> mask [N, T] bool.
    """
    return mask & ~truncated.unsqueeze(-1)


# ---------------------------------------------------------------- aggregation
# Each takes this micro-batch's per-token loss and mask and the step's GLOBAL count(s), so summing
# the results over micro-batches (and SUM-all-reducing gradients over ranks) gives the loss of the
# whole step. torch.where, not multiplication, drops padding: inf * 0 would be NaN.


def _masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # [N, T], [N, T] -> [N]
    return torch.where(mask, per_token, 0.0).sum(dim=-1)


def aggregate_dapo(per_token: torch.Tensor, mask: torch.Tensor, global_tokens: float) -> torch.Tensor:
    """DAPO token-level loss (the default): sum of all scored tokens / step token count -> scalar.

    Every token weighs the same, so long completions are not down-weighted per token.
    """
    return _masked_sum(per_token, mask).sum() / global_tokens


def aggregate_grpo(per_token: torch.Tensor, mask: torch.Tensor, global_sequences: float) -> torch.Tensor:
    """DeepSeekMath eq. 3: mean over sequences of each sequence's token mean -> scalar.

    Sum over this micro-batch's sequences of (token sum / own length), / step sequence count. The
    inner mean is per sequence, so it needs no global count. `global_sequences` counts every row of
    the step, fully masked ones included (eq. 3's 1/G runs over all G outputs): an empty row adds 0
    to the sum but still 1 to the denominator.
    """
    lengths = mask.sum(dim=-1).clamp(min=1)  # [N]
    return (_masked_sum(per_token, mask) / lengths).sum() / global_sequences


def aggregate_dr_grpo(
    per_token: torch.Tensor, mask: torch.Tensor, global_sequences: float, max_completion_length: int
) -> torch.Tensor:
    """Dr. GRPO: token sum / (step sequence count * generation budget), a length-independent constant.

    Removes the 1/|o_i| factor that makes GRPO favour long wrong answers (Liu et al. 2025, sec. 3.1).
    `global_sequences` counts every row of the step, fully masked ones included, so the constant does
    not move when filtering or overlong masking empties rows.
    """
    return _masked_sum(per_token, mask).sum() / (global_sequences * max_completion_length)


def aggregate_bnpo(per_token: torch.Tensor, mask: torch.Tensor, global_tokens: float) -> torch.Tensor:
    """The "bnpo" loss (as TRL names it): token sum / the token count of the batch -> scalar.

    In TRL it divides by the tokens of the *local* batch (one device's micro-batch), while
    "dapo" divides by the tokens of the whole accumulated step; that is the only difference, and it
    makes bnpo depend on the micro-batch split. This module always passes global counts, so bnpo
    is, by construction, the same arithmetic as `aggregate_dapo`. It stays a named variant so
    configs written for it keep working and say what they mean; passing a local token count
    instead would reproduce TRL's split-dependent behaviour.
    """
    return aggregate_dapo(per_token, mask, global_tokens)  # same formula once the count is global


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "dapo": aggregate_dapo,
    "grpo": aggregate_grpo,
    "dr_grpo": aggregate_dr_grpo,
    "bnpo": aggregate_bnpo,
}

# keyword arguments each aggregation reads from `normalisers`
_NORMALISERS: dict[str, frozenset[str]] = {
    "dapo": frozenset({"global_tokens"}),
    "grpo": frozenset({"global_sequences"}),
    "dr_grpo": frozenset({"global_sequences", "max_completion_length"}),
    "bnpo": frozenset({"global_tokens"}),
}


def normalisers_needed(name: str) -> frozenset[str]:
    """Keyword names aggregation `name` needs. `global_*` are counts: sum `count_contributions`
    over the step's micro-batches, then all-reduce (SUM) over ranks. Others are config constants."""
    if name not in _NORMALISERS:
        raise ValueError(f"loss aggregation {name!r} is not one of {sorted(_NORMALISERS)}")
    return _NORMALISERS[name]


def count_contributions(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One micro-batch's share of the global counts: mask [N, T] -> {"global_tokens", "global_sequences"} scalars.

    global_tokens: scored tokens. global_sequences: rows, N, fully masked rows included (an
    overlong-filtered or zero-variance-filtered completion still counts; see the module docstring).
    """
    return {"global_tokens": mask.sum(), "global_sequences": torch.tensor(mask.shape[0])}


# ---------------------------------------------------------------- the loss


def grpo_loss(
    logp: torch.Tensor,  # [N, T] fp32, current policy, with grad
    old_logp: torch.Tensor,  # [N, T] policy that sampled (logp.detach() when mu = 1)
    ref_logp: torch.Tensor | None,  # [N, T] reference policy, or None
    advantages: torch.Tensor,  # [N]
    mask: torch.Tensor,  # [N, T] bool
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "dapo",
    normalisers: Mapping[str, float | torch.Tensor],
    importance_level: str = "token",
    surrogate: str = "clip",
    token_weights: torch.Tensor | None = None,  # [N, T] detached, e.g. rollout_correction.correction_weights
    keep: torch.Tensor | None = None,  # [N, T] bool, within mask: the tokens the surrogate counts (entropy_mask.py)
    keep_normalisers: Mapping[str, float | torch.Tensor] | None = None,  # the step's counts of `keep`
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Surrogate (+ beta * k3 KL per token) aggregated by `aggregation` -> (loss, stats).

    The surrogate is `surrogates.SURROGATES[surrogate]` ("clip": PPO/DAPO, "cispo") of the ratio
    `surrogates.RATIOS[importance_level]` ("token", "sequence": GSPO). `token_weights` multiply the
    surrogate only (not the KL term); a weight of 0 drops the token's loss but not its place in the counts
    (algorithms/rollout_correction.py). `normalisers` holds the step's global counts and constants
    (`normalisers_needed(aggregation)`). `keep` (the entropy mask, algorithms/entropy_mask.py) restricts the
    surrogate to its tokens, aggregated over `keep` with `keep_normalisers` (the step's counts of kept tokens,
    all-reduced like `normalisers`); the KL term stays on `mask` with `normalisers`. Without `keep` the
    arithmetic is today's, unchanged. stats (detached scalars, means over this micro-batch's scored
    tokens): clip_frac_low, clip_frac_high (where the surrogate clipped), ratio_mean (of the ratio used),
    and kl_mean whenever ref_logp is given (also at beta = 0, to watch).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs reference log-probs (ref_logp is None)")
    if importance_level not in RATIOS or surrogate not in SURROGATES:
        raise ValueError(f"importance_level {importance_level!r} / surrogate {surrogate!r}: choose from "
                         f"{sorted(RATIOS)} / {sorted(SURROGATES)}")
    ratio = RATIOS[importance_level](logp, old_logp, mask)  # [N, T]
    per_token, low, high = SURROGATES[surrogate](ratio, advantages, eps_low, eps_high)  # [N, T]
    if token_weights is not None:  # where, not *: a dropped token's loss is 0 even if it overflowed
        per_token = torch.where(token_weights > 0, per_token * token_weights.detach(), 0.0)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None  # [N, T]
    needed = normalisers_needed(aggregation)
    aggregate = AGGREGATIONS[aggregation]
    if keep is None:
        if kl is not None and beta > 0:
            per_token = per_token + beta * kl
        loss = aggregate(per_token, mask, **{k: normalisers[k] for k in needed})
    else:  # surrogate on the kept tokens over their counts, KL on every scored token over the full counts
        if keep_normalisers is None:
            raise ValueError("keep needs keep_normalisers (the step's counts of kept tokens)")
        loss = aggregate(per_token, keep & mask, **{k: keep_normalisers[k] for k in needed})
        if kl is not None and beta > 0:
            loss = loss + beta * aggregate(kl, mask, **{k: normalisers[k] for k in needed})

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_frac_low": (low & mask).sum() / n,
            "clip_frac_high": (high & mask).sum() / n,
            "ratio_mean": torch.where(mask, ratio.detach(), 0.0).sum() / n,
        }
        if kl is not None:
            stats["kl_mean"] = torch.where(mask, kl, 0.0).sum() / n
    return loss, stats
