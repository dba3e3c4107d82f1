"""GRPO's loss as a sum of per-token terms, each of its own token's log-prob: what the fused LM head consumes.

`logprobs.fused_token_loss` (Liger's pattern; issue 13 item 3) computes each chunk of tokens' logits once and
applies the loss's gradient on the spot, so it needs, chunk by chunk, d loss / d logp of every token in
forward. That exists when the loss is separable:

    loss = sum_t a_t (surrogate(r_t, A_t) w_t + beta k3(logp_t, ref_t)),   r_t = exp(logp_t - old_t)

with a_t the aggregation's weight of token t (every aggregation in `grpo.AGGREGATIONS` is linear in the per-token
loss, so a_t is its gradient at any point: DAPO 1 / step tokens, GRPO 1 / (|o_i| x step sequences), Dr. GRPO
1 / (step sequences x max length)) and w_t the token-level rollout correction (TIS / MIS of old_t against the
engine's log-prob). `grpo_loss` composes the very same functions on [N, T] tensors; `TokenLoss` applies them to
the scored tokens of a chunk, in `target_mask.nonzero()` order (the order `policy.Policy` feeds the head).

Not separable, so run through the blocked head: GSPO's sequence ratio, a
sequence-level rollout correction (both read the whole completion's log-probs) and the entropy mask (its
threshold is a quantile of the step's entropies, known only after every forward): `separable.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from grpo_fsdp.algorithms.grpo import AGGREGATIONS, kl_k3, normalisers_needed
from grpo_fsdp.algorithms.rollout_correction import correction_weights
from grpo_fsdp.algorithms.surrogates import SURROGATES, token_ratio


def aggregation_weights(mask: torch.Tensor, aggregation: str, normalisers: Mapping[str, float | torch.Tensor]
                        ) -> torch.Tensor:
    """d aggregate(x, mask, ...) / d x [N, T]: each token's weight in the loss (the aggregations are linear in x)."""
    x = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        total = AGGREGATIONS[aggregation](x, mask, **{k: normalisers[k] for k in normalisers_needed(aggregation)})
        return torch.autograd.grad(total, x)[0]


class TokenLoss:
    """`token_grad(logp [k], lo, hi) -> (sum of the chunk's loss terms, d / d logp [k])` for one micro-batch.

    mask [N, T] bool, advantages [N], old / ref / engine [N, T] or None (old None: the log-probs being computed,
    detached: one update per rollout), settings as `grpo_loss` takes them; normalisers: the step's global counts.
    Tokens lo:hi are those of `mask.nonzero()` in order."""

    def __init__(self, mask: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
                 engine: torch.Tensor | None, *, eps_low: float, eps_high: float, beta: float, aggregation: str,
                 normalisers: Mapping[str, float | torch.Tensor], surrogate: str, correction: str, correction_cap: float):
        sel = mask.nonzero(as_tuple=True)
        self.adv = advantages.to(torch.float32)[sel[0]]
        self.old, self.ref, self.engine = (None if x is None else x[sel] for x in (old, ref, engine))
        self.weight = aggregation_weights(mask, aggregation, normalisers)[sel]
        self.eps_low, self.eps_high, self.beta = eps_low, eps_high, beta
        self.surrogate, self.correction, self.cap = SURROGATES[surrogate], correction, correction_cap
        if beta > 0 and ref is None:
            raise ValueError(f"beta={beta} > 0 needs reference log-probs (ref is None)")

    def __call__(self, logp: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        lp = logp.detach().requires_grad_()
        old = lp.detach() if self.old is None else self.old[lo:hi]
        ratio = token_ratio(lp, old)[:, None]  # [k, 1]: k completions of one token each, as grpo_loss sees them
        terms, _, _ = self.surrogate(ratio, self.adv[lo:hi], self.eps_low, self.eps_high)
        engine = None if self.engine is None else self.engine[lo:hi, None]
        w = correction_weights(self.correction, old[:, None], engine, torch.ones_like(ratio, dtype=torch.bool), self.cap,
                               "token")
        if w is not None:  # where, not *: a dropped token's loss is 0 even if it overflowed
            terms = torch.where(w > 0, terms * w, 0.0)
        terms = terms.squeeze(1)
        if self.beta > 0:
            terms = terms + self.beta * kl_k3(lp, self.ref[lo:hi])
        total = (self.weight[lo:hi] * terms).sum()
        return total.detach(), torch.autograd.grad(total, lp)[0]
