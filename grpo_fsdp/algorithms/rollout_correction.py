"""Correcting for the rollout engine sampling from a slightly different policy than the trainer's.

The engine (vLLM, or transformers with a KV cache) reports the log-prob of every token it sampled
(`rollout.base.Completion.logprobs`); the trainer recomputes it with the same weights (old log-probs).
They differ by kernels, precision (bf16 vs fp32), batch composition, or a stale weight sync, so the
completions are slightly off-policy even at mu = 1, where the PPO ratio pi / pi_old is exactly 1 and
corrects nothing. With rho_t = pi_trainer_old(y_t) / pi_engine(y_t), `algo.rollout_correction`:

  none  rho is only logged.
  tis   truncated importance sampling: the surrogate of each token is multiplied by sg(min(rho_t, C))
        (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
        fengyao.notion.site; TRL's vllm_importance_sampling_correction, verl's rollout_is).
  mis   masked importance sampling: tokens with rho_t outside [1/C, C] get no loss at all, the others
        an unchanged loss (IcePop, Ling team 2025, "Small Leak Can Sink a Great Ship"; OpenRLHF icepop).
        IcePop's band is [0.5, 5]; ours is symmetric in log space, [1/C, C].

`algo.rollout_correction_level=sequence` uses one rho per completion, the geometric mean
rho_i = exp(mean over its scored tokens of log rho_t), for every token of it: TIS caps it, MIS drops
the whole completion when it leaves [1/C, C]. (verl's sequence-level TIS uses the product of the
rho_t, unbiased but with a variance exponential in the length, so the cap binds on nearly every long
completion; the geometric mean is the length-normalised form GSPO uses for its own ratio.)
`algo.rollout_correction_cap` is C (default 2, Yao et al.'s value).

Default: tis, token level, C = 2. Why: it is Yao et al.'s recommendation and what the peers ship; it
is exactly the identity when engine and trainer agree (the transformers engine in fp32 agrees to
~1e-6), so it costs nothing there; it never drops a token's gradient, only caps the weight of tokens
the engine under-sampled, while MIS throws away the tokens that disagree most, which are also the
rare, informative ones (use it when the mismatch is large: MoE routing, fp8/bf16 engines).

Normalisation (DESIGN.md, "Loss normalisation"): a masked or down-weighted token keeps its place in
the step's all-reduced counts; it contributes 0 (or w * loss) to the sum, as in IcePop's objective
(the mask sits inside the 1 / sum|y_i| average). So the counts do not depend on the trainer's forward
(they are all-reduced before it, once per step, as before) and masking many tokens shrinks the step
rather than re-weighting the surviving tokens up. Only the surrogate is corrected, not the k3 KL term
(the correction re-weights the policy-gradient estimator, as in Yao et al. and verl).

Shapes: old_logp, engine_logp [N, T] (0 off the mask), mask [N, T] bool.
"""

from __future__ import annotations

import math

import torch


def log_rho(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log(pi_trainer_old / pi_engine) per token [N, T], or (level "sequence") each row's mean over its scored
    tokens repeated over T. 0 off the mask (and on rows with no scored token). No gradient."""
    d = torch.where(mask, old_logp.detach() - engine_logp.detach(), 0.0)  # [N, T]
    if level == "token":
        return d
    if level == "sequence":
        return (d.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).unsqueeze(-1).expand_as(d)
    raise ValueError(f"rollout correction level {level!r} is not one of token, sequence")


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float,
                level: str = "token") -> torch.Tensor:
    """TIS: min(rho, C) per token [N, T], detached (rho per token or per sequence, see `log_rho`)."""
    return torch.exp(log_rho(old_logp, engine_logp, mask, level)).clamp(max=cap)


def mis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float,
                level: str = "token") -> torch.Tensor:
    """MIS: 1.0 where rho is inside [1/C, C], else 0.0, per token [N, T] (rho per token or per sequence)."""
    lr = log_rho(old_logp, engine_logp, mask, level)
    return (lr.abs() <= math.log(cap)).to(torch.float32)


def correction_weights(kind: str, old_logp: torch.Tensor, engine_logp: torch.Tensor | None, mask: torch.Tensor,
                       cap: float, level: str) -> torch.Tensor | None:
    """The weights `grpo_loss` multiplies the surrogate with [N, T], or None for "none" (or no engine log-probs)."""
    if kind == "none" or engine_logp is None:
        return None
    if kind == "tis":
        return tis_weights(old_logp, engine_logp, mask, cap, level)
    if kind == "mis":
        return mis_weights(old_logp, engine_logp, mask, cap, level)
    raise ValueError(f"rollout correction {kind!r} is not one of none, tis, mis")


def corrected_tokens(kind: str, weights: torch.Tensor | None, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """How many scored tokens the correction touched (a scalar): capped by TIS (weight == C) or dropped by MIS."""
    if weights is None:
        return torch.zeros((), dtype=torch.long)
    touched = weights >= cap if kind == "tis" else weights == 0
    return (touched & mask).sum()


def mismatch_sums(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float
                  ) -> dict[str, torch.Tensor]:
    """This micro-batch's share of the mismatch metrics (sums, to add over micro-batches and ranks; max to max):

    kl       sum of k3 = rho - 1 - log rho (rho = pi_trainer / pi_engine): estimates KL(engine || trainer)
             per token under the engine's samples, >= 0, 0 iff they agree
    abs      sum of |log pi_trainer - log pi_engine|;  abs_max  its max (0 with no scored token)
    outside  tokens with rho outside [1/C, C]
    tokens   scored tokens
    """
    d = torch.where(mask, old_logp.detach() - engine_logp.detach(), 0.0)  # log rho, [N, T]
    k3 = torch.expm1(d) - d  # precise near 0, where nearly every token sits
    return {"kl": k3.sum(), "abs": d.abs().sum(), "abs_max": d.abs().max() if d.numel() else d.new_zeros(()),
            "outside": ((d.abs() > math.log(cap)) & mask).sum(), "tokens": mask.sum()}
