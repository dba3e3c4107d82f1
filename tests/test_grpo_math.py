"""GRPO maths against hand-computed values (arithmetic in the comments), tolerance 1e-6."""

import math

import pytest
import torch

from grpo_fsdp.algorithms.grpo import (
    AGGREGATIONS,
    aggregate_bnpo,
    aggregate_dapo,
    aggregate_dr_grpo,
    aggregate_grpo,
    clip_regions,
    clipped_surrogate,
    count_contributions,
    group_advantages,
    grpo_loss,
    kl_k3,
    mask_truncated,
    normalisers_needed,
    zero_variance_groups,
)

EPS = 1e-6


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- advantages

# G = 4, three groups:
#   g0 [1, 0, 0, 0]      mean 0.25, centred [0.75, -0.25, -0.25, -0.25]
#                        population var (0.5625 + 3 * 0.0625) / 4 = 0.1875, std sqrt(3)/4
#   g1 [1, 1, 1, 1]      zero variance -> advantages exactly 0
#   g2 [0, 1, 0.5, 0.5]  mean 0.5, centred [-0.5, 0.5, 0, 0], var (0.25 + 0.25) / 4 = 0.125
REWARDS = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0.5, 0.5])
CENTRED = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, 0.5, 0, 0]


def test_zero_variance_groups():
    assert zero_variance_groups(REWARDS, 4).tolist() == [False, True, False]
    assert zero_variance_groups(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2).tolist() == [False, False]


def test_advantages_group_scale_uses_population_std():
    s0, s2 = math.sqrt(0.1875), math.sqrt(0.125)
    expected = [c / (s0 + EPS) for c in CENTRED[:4]] + [0.0] * 4 + [c / (s2 + EPS) for c in CENTRED[8:]]
    close(group_advantages(REWARDS, 4, "group"), expected)
    # the documented choice: not torch.std's Bessel-corrected default (g0 would be 0.75 / 0.5 = 1.5)
    assert abs(group_advantages(REWARDS, 4, "group")[0].item() - 1.5) > 0.2


def test_advantages_two_per_group():
    # rewards [1, 0, 0, 1], G = 2: each group mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6)
    a = 0.5 / (0.5 + EPS)
    close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), [a, -a, -a, a])


def test_advantages_batch_scale():
    # all 12 rewards: sum 1 + 4 + 2 = 7, sum of squares 1 + 4 + 1 + 0.25 + 0.25 = 6.5
    # population var 6.5/12 - (7/12)^2 = 78/144 - 49/144 = 29/144, std sqrt(29)/12
    std = math.sqrt(29) / 12
    close(group_advantages(REWARDS, 4, "batch"), [c / (std + EPS) for c in CENTRED])


def test_advantages_no_scale_is_group_centred():
    close(group_advantages(REWARDS, 4, "none"), CENTRED)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_gives_exact_zeros(scale):
    # In fp32 the mean of seven 0.3s is 0.3 - 2.98e-8 (measured), so (r - mean) / (0 + 1e-6) would be
    # 0.03, a spurious advantage. The function zeroes groups whose rewards are all equal explicitly.
    rewards = torch.tensor([0.1] * 7 + [0.3] * 7)
    assert (rewards.reshape(2, 7) - rewards.reshape(2, 7).mean(1, keepdim=True)).abs().max() > 0  # the trap is real
    adv = group_advantages(rewards, 7, scale)
    assert adv.tolist() == [0.0] * 14 and not adv.isnan().any()
    assert group_advantages(torch.ones(1), 1, scale).tolist() == [0.0]  # G = 1: no NaN either


def test_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="'median'"):
        group_advantages(torch.zeros(4), 2, "median")


# ---------------------------------------------------------------- k3 KL


def test_kl_k3_values_sign_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, 0.0], dtype=torch.float64)
    # d = ref - logp = [-0.5, 0, 0.5]; k3 = e^d - d - 1
    expected = [math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.5) - 0.5 - 1]  # [0.10653, 0, 0.14872]
    k = kl_k3(logp, ref)
    close(k.detach(), expected)
    k.sum().backward()
    close(logp.grad, [1 - math.exp(-0.5), 0.0, 1 - math.exp(0.5)])  # d k3 / d logp = 1 - e^d

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g) * 3, torch.randn(4, 7, generator=g) * 3
    assert (kl_k3(a, b) >= 0).all()
    assert kl_k3(a, a).eq(0).all()


# ---------------------------------------------------------------- clipped surrogate

# eps_low 0.2, eps_high 0.28 (DAPO): the ratio is kept in [0.8, 1.28].
# seq0, A = +2, ratios [1.5, 0.5, 1.25]:
#   1.5 > 1.28 with A > 0 -> clipped: -min(3.0, 1.28*2 = 2.56) = -2.56, no gradient
#   0.5 with A > 0       -> -min(1.0, 0.8*2 = 1.6) = -1.0, gradient -A*ratio = -1.0
#   1.25 (clipped at symmetric 0.2, not with clip-higher) -> -2.5, gradient -2.5
# seq1, A = -1, ratios [0.5, 1.5, 0.9]:
#   0.5 < 0.8 with A < 0 -> clipped: -min(-0.5, -0.8) = 0.8, no gradient
#   1.5 with A < 0       -> -min(-1.5, -1.28) = 1.5, gradient -A*ratio = 1.5
#   0.9 inside           -> 0.9, gradient 0.9
RATIOS = [[1.5, 0.5, 1.25], [0.5, 1.5, 0.9]]
ADV = torch.tensor([2.0, -1.0], dtype=torch.float64)


def _ratio_inputs():
    old = torch.tensor([[-1.0, -0.3, -2.0], [-0.7, -1.1, -0.2]], dtype=torch.float64)
    logp = (old + torch.tensor(RATIOS, dtype=torch.float64).log()).requires_grad_(True)
    return logp, old


def test_clipping_at_both_bounds_and_zero_gradient_there():
    logp, old = _ratio_inputs()
    loss, clipped = clipped_surrogate(logp, old, ADV, 0.2, 0.28)
    close(loss.detach(), [[-2.56, -1.0, -2.5], [0.8, 1.5, 0.9]])
    assert clipped.tolist() == [[True, False, False], [True, False, False]]
    low, high = clip_regions(logp, old, ADV, 0.2, 0.28)
    assert low.tolist() == [[False] * 3, [True, False, False]]
    assert high.tolist() == [[True, False, False], [False] * 3]
    loss.sum().backward()
    close(logp.grad, [[0.0, -1.0, -2.5], [0.0, 1.5, 0.9]])
    assert logp.grad[clipped].eq(0).all()


def test_grpo_loss_stats():
    logp, old = _ratio_inputs()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # dapo over 5 tokens: (-2.56 - 1.0 - 2.5 + 0.8 + 1.5) / 5 = -3.76 / 5
    loss, stats = grpo_loss(logp, old, None, ADV, mask, eps_low=0.2, eps_high=0.28, normalisers={"global_tokens": 5})
    close(loss.detach(), -3.76 / 5)
    close(stats["clip_frac_low"], 1 / 5)
    close(stats["clip_frac_high"], 1 / 5)
    close(stats["ratio_mean"], (1.5 + 0.5 + 1.25 + 0.5 + 1.5) / 5)
    assert "kl_mean" not in stats


def test_kl_term_added_per_token_only_with_beta():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.5, -2.0]], dtype=torch.float64)  # d = [0.5, 0]
    mask, adv, norm = torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0], dtype=torch.float64), {"global_tokens": 2}
    k = math.exp(0.5) - 0.5 - 1
    # ratio 1, A = 1: surrogate -1 per token; with beta 0.1: (-1 + 0.1*k - 1 + 0) / 2
    loss, stats = grpo_loss(logp, logp, ref, adv, mask, beta=0.1, normalisers=norm)
    close(loss, (-2 + 0.1 * k) / 2)
    close(stats["kl_mean"], k / 2)
    loss0, stats0 = grpo_loss(logp, logp, ref, adv, mask, beta=0.0, normalisers=norm)
    close(loss0, -1.0)
    close(stats0["kl_mean"], k / 2)  # still reported at beta = 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, None, adv, mask, beta=0.1, normalisers=norm)


# ---------------------------------------------------------------- aggregation

# Three sequences, lengths 3, 1, 4; padding holds nan/inf, which must not leak into the loss.
#   token sums: 1+2+3 = 6, 5, 9+10+11+12 = 42; total 53 over 8 tokens
PER_TOKEN = torch.tensor([[1, 2, 3, math.nan], [5, math.inf, math.inf, math.inf], [9, 10, 11, 12]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_aggregations_by_hand():
    close(aggregate_dapo(PER_TOKEN, MASK, 8), 53 / 8)  # 6.625
    close(aggregate_dapo(PER_TOKEN, MASK, 16), 53 / 16)  # this micro-batch is half of the step's tokens
    close(aggregate_grpo(PER_TOKEN, MASK, 3), (6 / 3 + 5 / 1 + 42 / 4) / 3)  # (2 + 5 + 10.5) / 3
    close(aggregate_dr_grpo(PER_TOKEN, MASK, 3, 4), 53 / (3 * 4))  # 4.41667
    close(aggregate_bnpo(PER_TOKEN, MASK, 8), 53 / 8)  # same arithmetic as dapo once the count is global


def test_counts_and_truncation_mask():
    truncated = torch.tensor([False, True, False])
    masked = mask_truncated(MASK, truncated)
    assert masked.tolist() == [[True, True, True, False], [False] * 4, [True] * 4]
    counts = count_contributions(masked)  # the empty row scores no token but is still a sequence: 7 tokens, 3 sequences
    assert counts["global_tokens"].item() == 7 and counts["global_sequences"].item() == 3
    close(aggregate_grpo(PER_TOKEN, masked, 3), (2 + 0 + 10.5) / 3)


# The same three rows with row 1 fully masked (overlong-filtered, or its group dropped as zero-variance).
#   scored tokens: row 0 [1, 2, 3] (sum 6, length 3), row 1 none, row 2 [9, 10, 11, 12] (sum 42, length 4)
#   -> 7 tokens, token sum 48; 3 rows in the step
EMPTY_ROW_MASK = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize(("name", "expected"), [
    ("grpo", (6 / 3 + 0 + 42 / 4) / 3),  # DeepSeekMath: 1/G over all G outputs = (2 + 0 + 10.5) / 3 = 4.1667, not / 2
    ("dr_grpo", 48 / (3 * 4)),  # Dr. GRPO: / (3 rows x budget 4) = 4.0, not 48 / (2 x 4) = 6.0
    ("dapo", 48 / 7),  # token level: the empty row has no token, so it is simply absent
    ("bnpo", 48 / 7),
])
def test_an_empty_row_counts_in_the_sequence_denominators(name, expected):
    """The counts the recipe all-reduces come from `count_contributions`; an empty row is one of the
    step's sequences, so the grpo and dr_grpo denominators are those of the papers (issue 11, item 15)."""
    counts = count_contributions(EMPTY_ROW_MASK)
    assert counts["global_tokens"].item() == 7 and counts["global_sequences"].item() == 3
    norm = {**counts, "max_completion_length": 4}
    loss = AGGREGATIONS[name](PER_TOKEN, EMPTY_ROW_MASK, **{k: norm[k] for k in normalisers_needed(name)})
    close(loss, expected)


def test_dr_grpo_normaliser_does_not_move_when_a_row_is_masked():
    # rows 0 and 2 keep the same scored tokens; masking row 1 (token 5) removes only its 5 from the sum:
    # unmasked (6 + 5 + 42) / (3 x 4) = 53 / 12, masked (6 + 42) / (3 x 4) = 48 / 12 -- same denominator 12
    for mask, total in ((MASK, 53), (EMPTY_ROW_MASK, 48)):
        n = count_contributions(mask)["global_sequences"]
        close(aggregate_dr_grpo(PER_TOKEN, mask, n, 4), total / 12)


def test_normalisers_needed():
    assert normalisers_needed("dapo") == normalisers_needed("bnpo") == {"global_tokens"}
    assert normalisers_needed("grpo") == {"global_sequences"}
    assert normalisers_needed("dr_grpo") == {"global_sequences", "max_completion_length"}
    assert set(AGGREGATIONS) == {"dapo", "grpo", "dr_grpo", "bnpo"}
    with pytest.raises(ValueError, match="'sum'"):
        normalisers_needed("sum")


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_micro_batch_invariance(name):
    g = torch.Generator().manual_seed(1)
    n, t = 6, 5
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    logp = (old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = old + 0.1 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2])  # ragged, one empty completion
    mask = torch.arange(t) < lengths.unsqueeze(1)
    counts = count_contributions(mask)  # what the recipe all-reduces: 15 tokens, 6 sequences (the empty one counts)
    normalisers = {**counts, "max_completion_length": t}
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.04, "aggregation": name, "normalisers": normalisers}

    whole, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    (grad_whole,) = torch.autograd.grad(whole, logp)
    parts = [grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], **kw)[0] for s in (slice(0, 2), slice(2, 6))]
    split = parts[0] + parts[1]
    (grad_split,) = torch.autograd.grad(split, logp)
    close(split.detach(), whole.detach().item())
    close(grad_split, grad_whole)
    # a micro-batch's own count would not be invariant (the test can tell the difference)
    if name == "dapo":
        local = sum(aggregate_dapo(p, m, m.sum()) for p, m in ((logp[:2], mask[:2]), (logp[2:], mask[2:]))) / 2
        assert abs(local.item() - aggregate_dapo(logp, mask, mask.sum()).item()) > 1e-3


# ---------------------------------------------------------------- mu = 1 is REINFORCE


def _toy_logp(weight, prompts, tokens):
    # bigram softmax policy over a vocabulary of 5: logits of token t = W[previous token]
    prev = torch.cat([prompts.unsqueeze(1), tokens[:, :-1]], dim=1)  # [N, T]
    return torch.log_softmax(weight[prev], dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, T]


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_on_policy_gradient_is_reinforce_with_group_mean_baseline(name):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # B = 2 prompts (tokens 0 and 3), G = 2 completions each, lengths 3, 2, 4, 1 (pad id 0)
    prompts = torch.tensor([0, 0, 3, 3])
    tokens = torch.tensor([[1, 2, 4, 0], [4, 4, 0, 0], [2, 1, 3, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    # rewards [1, 0 | 0.25, 1]: group means 0.5 and 0.625 -> A = [0.5, -0.5, -0.375, 0.375]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.25, 1.0], dtype=torch.float64), 2, "none")
    close(adv, [0.5, -0.5, -0.375, 0.375])

    logp = _toy_logp(weight, prompts, tokens)
    normalisers = {"global_tokens": 10, "global_sequences": 4, "max_completion_length": 4}  # 3+2+4+1 tokens
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, aggregation=name, normalisers=normalisers)
    (grad,) = torch.autograd.grad(loss, weight)
    assert stats["clip_frac_low"] == 0 and stats["clip_frac_high"] == 0 and stats["ratio_mean"] == 1

    # REINFORCE: -sum_i A_i * w_i * grad(sum_t logp_it), w_i the variant's weight of sequence i
    lengths = torch.tensor([3.0, 2.0, 4.0, 1.0], dtype=torch.float64)
    w = {
        "dapo": torch.full((4,), 1 / 10),
        "bnpo": torch.full((4,), 1 / 10),
        "grpo": 1 / (lengths * 4),
        "dr_grpo": torch.full((4,), 1 / (4 * 4)),
    }[name].double()
    seq_logp = (_toy_logp(weight, prompts, tokens) * mask).sum(-1)  # [N]
    (reinforce,) = torch.autograd.grad(-(adv * w * seq_logp).sum(), weight)
    close(grad, reinforce)
    assert reinforce.abs().max() > 1e-3  # not trivially zero
