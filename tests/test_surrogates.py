"""GSPO's sequence ratio and CISPO's clipped IS weight (algorithms/surrogates.py) against values and gradients
worked out by hand in each test, through `grpo_loss` as the recipe calls it."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fsdp.algorithms.grpo import clipped_surrogate, grpo_loss
from grpo_fsdp.algorithms.surrogates import cispo, loss_parts, ppo_clip, sequence_ratio, token_ratio


def close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0), (a, b)


# Two completions: row 0 has two scored tokens with log-ratios 0.1 and 0.3; row 1 one token with -0.6, then padding.
OLD = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
DELTA = torch.tensor([[0.1, 0.3], [-0.6, 5.0]])  # the padding column's 5.0 must not leak in
MASK = torch.tensor([[True, True], [True, False]])
ADV = torch.tensor([1.0, -1.0])


def leaf(x):
    return x.clone().requires_grad_(True)


def test_sequence_ratio_is_the_length_normalised_ratio():
    logp = OLD + DELTA
    s = sequence_ratio(logp, OLD, MASK)
    close(s, [[math.exp(0.2)] * 2, [math.exp(-0.6)] * 2])  # geometric means: (0.1 + 0.3) / 2 and -0.6 / 1
    close(sequence_ratio(logp, OLD, torch.zeros_like(MASK)), torch.ones(2, 2))  # a row with no scored token: 1
    close(token_ratio(logp, OLD), torch.exp(DELTA))


@pytest.mark.parametrize(("aggregation", "normalisers"), [("grpo", {"global_sequences": 2}), ("dapo", {"global_tokens": 3})])
def test_gspo_loss_and_gradient_by_hand(aggregation, normalisers):
    logp = leaf(OLD + DELTA)
    loss, stats = grpo_loss(logp, OLD, None, ADV, MASK, eps_low=0.2, eps_high=0.28, aggregation=aggregation,
                            normalisers=normalisers, importance_level="sequence")
    s0, s1 = math.exp(0.2), math.exp(-0.6)  # 1.221 inside [0.8, 1.28]; 0.549 < 0.8 with A < 0: clipped, no gradient
    per_seq = [-s0 * 1.0, -0.8 * -1.0]  # -min(s A, clip(s) A)
    if aggregation == "grpo":  # GSPO exactly: (1/G) sum_i of the sequence terms
        close(loss, (per_seq[0] + per_seq[1]) / 2)
        # d/dlogp_t of -s0 / 2 = -(s0 / 2) * (1/2) for each of row 0's two tokens
        want = [[-s0 / 4, -s0 / 4], [0.0, 0.0]]
    else:  # token level: each token of a sequence carries its sequence's term
        close(loss, (2 * per_seq[0] + per_seq[1]) / 3)
        want = [[-s0 / 3, -s0 / 3], [0.0, 0.0]]  # d/dlogp_t of 2 (-s0) / 3 = -2 s0 (1/2) / 3
    loss.backward()
    close(logp.grad, want)
    close(stats["clip_frac_low"], 1 / 3)  # row 1's token
    close(stats["ratio_mean"], (2 * s0 + s1) / 3)


def test_gspo_equals_the_token_ratio_on_one_token_completions():
    logp = OLD[:, :1] + DELTA[:, :1]
    m = torch.ones(2, 1, dtype=torch.bool)
    close(sequence_ratio(logp, OLD[:, :1], m), token_ratio(logp, OLD[:, :1]))


def test_cispo_clips_the_weight_and_keeps_every_gradient():
    delta = torch.tensor([[0.5, -0.5], [0.1, 0.0]])
    logp = leaf(OLD + delta)
    adv = torch.tensor([1.0, -2.0])
    loss, stats = grpo_loss(logp, OLD, None, adv, MASK, eps_low=0.2, eps_high=0.28, aggregation="dapo",
                            normalisers={"global_tokens": 3}, surrogate="cispo")
    w = [1.28, 0.8, math.exp(0.1)]  # clip(e^0.5 = 1.65) = 1.28, clip(e^-0.5 = 0.61) = 0.8, e^0.1 = 1.105 unclipped
    per_token = [-w[0] * 1.0, -w[1] * 1.0, -w[2] * -2.0]  # -sg(w) A (value of r / sg(r) is 1)
    close(loss, sum(per_token) / 3)
    loss.backward()
    # gradient -w A / 3 on every scored token, clipped ones included (PPO's clip would give 0 on token (0, 0))
    close(logp.grad, [[-1.28 / 3, -0.8 / 3], [2 * math.exp(0.1) / 3, 0.0]])
    close(stats["clip_frac_high"], 1 / 3)
    close(stats["clip_frac_low"], 1 / 3)
    # the PPO clip on the same tokens: token (0, 0) is clipped (r > 1.28, A > 0), so its gradient is 0
    ppo = leaf(OLD + delta)
    loss_ppo, _ = grpo_loss(ppo, OLD, None, adv, MASK, eps_low=0.2, eps_high=0.28, aggregation="dapo",
                            normalisers={"global_tokens": 3})
    loss_ppo.backward()
    assert ppo.grad[0, 0] == 0 and logp.grad[0, 0] != 0


def test_cispo_on_policy_is_reinforce():
    """At mu = 1 (old = logp) CISPO's weight is 1: the gradient is -A / tokens, the clip surrogate's."""
    logp = leaf(OLD)
    loss, _ = grpo_loss(logp, logp.detach(), None, ADV, MASK, aggregation="dapo", normalisers={"global_tokens": 3},
                        surrogate="cispo")
    loss.backward()
    close(logp.grad, [[-1 / 3, -1 / 3], [1 / 3, 0.0]])


def test_surrogates_by_hand_and_loss_names():
    r = torch.tensor([[1.5, 0.5]])
    per, low, high = ppo_clip(r, torch.tensor([1.0]), 0.2, 0.28)
    close(per, [[-1.28, -0.5]])  # -min(1.5, 1.28), -min(0.5, 0.8)
    assert high.tolist() == [[True, False]] and low.tolist() == [[False, False]]
    per, low, high = cispo(r, torch.tensor([-1.0]), 0.2, 0.28)
    close(per, [[1.28, 0.8]])
    assert high.tolist() == [[True, False]] and low.tolist() == [[False, True]]
    # the old entry point is the token ratio through ppo_clip
    logp = OLD + DELTA
    per_token, clipped = clipped_surrogate(logp, OLD, ADV, 0.2, 0.28)
    close(per_token, ppo_clip(torch.exp(DELTA), ADV, 0.2, 0.28)[0])
    assert clipped.tolist() == [[False, True], [True, False]]  # e^0.3 > 1.28 with A > 0; e^-0.6 < 0.8 with A < 0
    assert loss_parts("cispo") == ("cispo", "dapo") and loss_parts("grpo") == ("clip", "grpo")
    with pytest.raises(ValueError, match="importance_level"):
        grpo_loss(logp, OLD, None, ADV, MASK, aggregation="dapo", normalisers={"global_tokens": 3}, importance_level="seq")
