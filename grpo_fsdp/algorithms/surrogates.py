"""Importance ratios and policy-gradient surrogates: PPO's clip (token or GSPO's sequence ratio) and CISPO.

Pure functions of tensors; `grpo.grpo_loss` composes them with the aggregations in `grpo.py`. Shapes as
there: N completions, T positions, `mask [N, T]` bool marks the scored tokens, advantages [N].

Ratios (`algo.importance_level`), each [N, T] with gradient through `logp`:
  token     r_t = pi(y_t) / pi_old(y_t) = exp(logp_t - old_t)                                   (PPO, GRPO)
  sequence  s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|) = exp(mean over scored t of (logp_t - old_t)),
            the same value on every token of completion i                                    (GSPO)

Surrogates (per-token loss, before aggregation; `algo.loss` picks one, see `loss_parts`):
  clip      -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)                                    (PPO / DAPO)
  cispo     -sg(clip(r, 1 - eps_low, 1 + eps_high)) A r / sg(r)                                (CISPO)

Sources:
  GSPO   Zheng et al. 2025, "Group Sequence Policy Optimization" (Qwen, arXiv 2507.18071), sec. 4
         (the objective, the sequence ratio s_i, the GSPO-token variant).
  CISPO  MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"
         (arXiv 2506.13585), sec. 3 (CISPO).

Where this departs from the papers:
  * GSPO's objective is per sequence: (1/G) sum_i min(s_i A_i, clip(s_i) A_i). Here s_i is spread over
    the tokens of completion i, so any aggregation can follow. With `algo.loss=grpo` (mean over
    sequences of token means) the value and gradient are exactly GSPO's: each sequence's token mean of
    a constant is that constant. With the token-level aggregations ("dapo", the default) a completion
    weighs by its length, as a token-level loss does; the gradient of each sequence is still
    s_i A_i grad(log s_i) = s_i A_i mean_t grad(log pi(y_t)), i.e. GSPO's, up to that weight. (Spreading
    s_i with its own gradient equals the paper's "GSPO-token" form sg(s_i) pi(y_t) / sg(pi(y_t)) in value
    and gradient when all tokens of a sequence share one advantage, as they do here.) The paper clips
    s_i in a far narrower band than PPO's (3e-4 / 4e-4, sec. 5.1), because a geometric mean moves little:
    set algo.clip_eps_low / clip_eps_high accordingly.
  * CISPO's objective is sg(clip(r)) A log pi(y_t): its gradient is sg(clip(r)) A grad(log pi), every
    token keeps a gradient (the IS weight is clipped, never the token). We write log pi as
    r / sg(r) (= exp(logp - sg(logp))), which has the same gradient but the value 1, so the logged
    loss is the clipped weight times the advantage, comparable to the clip surrogate's, instead of a
    log-prob-scaled number. MiniMax-M1 put no lower bound on the weight (a large eps_low) and tuned
    eps_high; here both bounds are algo.clip_eps_low / clip_eps_high (e.g. clip_eps_low=0.99 for
    practically none). Its normaliser is the token count of the batch: `loss_parts("cispo")` aggregates
    like "dapo" (the step's token count, all-reduced).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def token_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PPO's per-token ratio: logp, old_logp [N, T], mask [N, T] -> exp(logp - old) [N, T] (grad through logp)."""
    return torch.exp(logp - old_logp.detach())


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence ratio s_i, repeated over the T positions -> [N, T] (grad through logp).

    s_i = exp(sum_t mask (logp - old) / |y_i|), |y_i| the scored tokens of row i; a row with none gets 1.
    """
    log_ratio = torch.where(mask, logp - old_logp.detach(), 0.0).sum(dim=-1)  # [N]
    lengths = mask.sum(dim=-1).clamp(min=1)  # [N]
    return torch.exp(log_ratio / lengths).unsqueeze(-1).expand_as(logp)  # [N, T]


RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_ratio,
    "sequence": sequence_ratio,
}


def ppo_clip(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A): ratio [N, T], advantages [N] -> (loss, low, high) [N, T].

    low / high (bool): where the clipped branch is active and the token has no gradient
    (r < 1 - eps_low with A < 0, r > 1 + eps_high with A > 0).
    """
    adv = advantages.detach().unsqueeze(-1)  # [N, 1]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    r = ratio.detach()
    return -torch.minimum(ratio * adv, clipped), (r < 1 - eps_low) & (adv < 0), (r > 1 + eps_high) & (adv > 0)


def cispo(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO: -sg(clip(r, 1 - eps_low, 1 + eps_high)) A r / sg(r) -> (loss, low, high) [N, T].

    Gradient per token: -clip(r) A grad(log pi). low / high (bool): where the weight was clipped
    (r < 1 - eps_low, r > 1 + eps_high), whatever the sign of A; those tokens keep their gradient.
    """
    adv = advantages.detach().unsqueeze(-1)  # [N, 1]
    r = ratio.detach()
    weight = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    return -weight * adv * (ratio / r), r < 1 - eps_low, r > 1 + eps_high


SURROGATES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "clip": ppo_clip,
    "cispo": cispo,
}

# algo.loss -> (surrogate, aggregation); a name not listed is an aggregation under the clip surrogate
_LOSSES: dict[str, tuple[str, str]] = {"cispo": ("cispo", "dapo")}


def loss_parts(loss: str) -> tuple[str, str]:
    """`algo.loss` -> (surrogate, aggregation): "cispo" -> ("cispo", "dapo"), "grpo" -> ("clip", "grpo"), ..."""
    return _LOSSES.get(loss, ("clip", loss))
