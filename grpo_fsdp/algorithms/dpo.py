"""DPO maths: preference losses on sequence log-probabilities, their implicit rewards, and the SFT term.

Pure functions of tensors, composed by `pair_losses`. Shapes: B preference pairs; `policy_*` and `ref_*` are
the SUMMED token log-probs of each completion given its prompt, `*_len` its scored-token counts, all [B].
Each variant is one small function of the two log-ratios

    x_c = log pi(y_c | x) - log ref(y_c | x)        x_r = log pi(y_r | x) - log ref(y_r | x)

(summed over tokens, or their per-token means for the length-normalised `dpo_norm`), and h = beta (x_c - x_r).

Sources and formulas:
  sigmoid   Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), eq. 7:
            L = -log sigma(h)
  dpo_norm  length-normalised DPO: the same loss on per-token MEAN log-probs, h = beta (x_c/|y_c| - x_r/|y_r|);
            SimPO's normalisation (Meng et al. 2024) with a reference, the loss of Tulu 3 (Lambert et al. 2024,
            arXiv 2411.15124, sec. 5) and OLMo 3's DPO (beta = 5 for both, open-instruct `dpo_norm`)
  ipo       Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
            (arXiv 2310.12036), eq. 17 with tau = beta: L = (x_c - x_r - 1 / (2 beta))^2, on SUMMED log-probs
            as in the paper (TRL averages them per token; that is `dpo_norm`'s normalisation, not IPO's)
  cDPO      label smoothing eps (Mitchell 2023, "A note on DPO with noisy preferences"), for sigmoid and
            dpo_norm: L = -(1 - eps) log sigma(h) - eps log sigma(-h)
  robust    Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409), eq. 8, unbiased under a
            preference-flip rate eps: L = ((1 - eps) (-log sigma(h)) - eps (-log sigma(-h))) / (1 - 2 eps)

With policy = reference every log-ratio is 0, h = 0 and sigmoid, dpo_norm, cDPO and robust all give exactly
ln 2 per pair (a packing bug that sums pairs instead of averaging shows up as k ln 2; tests check ln 2).

Aggregation (DESIGN.md, "Loss normalisation"): the per-pair losses of a micro-batch are summed and divided by
the number of pairs in the whole optimizer step (all micro-batches, all ranks, all-reduced by the caller), so
the gradient does not depend on the micro-batch size or world size. The optional SFT term on the chosen side
(`algo.sft_weight`, as in RPO, Pang et al. 2024, arXiv 2404.19733) is the chosen tokens' summed negative
log-likelihood divided by the step's all-reduced chosen-token count: a token mean like the SFT loss.

Implicit rewards (logged): beta x_c and beta x_r, with the same normalisation as the loss (means for dpo_norm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LENGTH_NORMALISED = ("dpo_norm",)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps [N, C] fp32, mask [N, C] bool -> (summed log-prob [N], scored tokens [N] float)."""
    return (token_logps * mask).sum(-1), mask.sum(-1).to(token_logps.dtype)


def cdpo_loss(h: torch.Tensor, eps: float) -> torch.Tensor:
    """[B] -> [B]: -(1 - eps) log sigma(h) - eps log sigma(-h); eps = 0 is DPO's sigmoid loss."""
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def robust_loss(h: torch.Tensor, eps: float) -> torch.Tensor:
    """[B] -> [B]: ((1 - eps) (-log sigma(h)) - eps (-log sigma(-h))) / (1 - 2 eps), eps in [0, 1/2)."""
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def _sigmoid(x_c, x_r, beta, eps):
    return cdpo_loss(beta * (x_c - x_r), eps)


def _robust(x_c, x_r, beta, eps):
    return robust_loss(beta * (x_c - x_r), eps)


def _ipo(x_c, x_r, beta, eps):
    del eps  # IPO has no label smoothing (validation refuses it)
    return (x_c - x_r - 1 / (2 * beta)) ** 2


# loss name -> (x_c [B], x_r [B], beta, label_smoothing) -> [B]; dpo_norm is sigmoid on per-token means
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": _sigmoid, "dpo_norm": _sigmoid, "ipo": _ipo, "robust": _robust}


def log_ratios(loss: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
    """All [B] -> (x_c [B], x_r [B]): log pi - log ref per completion, per-token means for `dpo_norm`."""
    x_c, x_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss in LENGTH_NORMALISED:
        x_c, x_r = x_c / chosen_len.clamp(min=1), x_r / rejected_len.clamp(min=1)
    return x_c, x_r


def pair_losses(loss: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor, beta: float,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit rewards, all [B] -> (loss [B], reward_chosen [B], reward_rejected [B]).

    Rewards are detached (they are logged, not trained)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}; choose one of {', '.join(LOSSES)}")
    x_c, x_r = log_ratios(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
    return LOSSES[loss](x_c, x_r, beta, label_smoothing), (beta * x_c).detach(), (beta * x_r).detach()


def step_loss(per_pair: torch.Tensor, global_pairs: float, chosen_token_nll: torch.Tensor | None = None,
              global_chosen_tokens: float = 0.0, sft_weight: float = 0.0) -> torch.Tensor:
    """This micro-batch's share of the step's loss: sum(per_pair [B]) / global_pairs
    + sft_weight * chosen_token_nll (scalar, summed over this micro-batch) / global_chosen_tokens."""
    total = per_pair.sum() / global_pairs
    if sft_weight > 0 and chosen_token_nll is not None:
        total = total + sft_weight * chosen_token_nll / max(global_chosen_tokens, 1.0)
    return total
