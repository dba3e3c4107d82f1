"""GRPO's loss through the fused LM head (algorithms/token_loss.py + logprobs.fused_token_loss) against the
blocked head + `grpo_loss` on dense log-probs: the same loss and the same gradients, for every aggregation, both
surrogates, the KL term, the token-level rollout corrections, with and without pi_old's log-probs."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL, TOY, read_metrics, run_train

from grpo_fsdp.algorithms.grpo import count_contributions, grpo_loss
from grpo_fsdp.algorithms.rollout_correction import correction_weights
from grpo_fsdp.algorithms.separable import fused_head_problem
from grpo_fsdp.algorithms.token_loss import TokenLoss, aggregation_weights
from grpo_fsdp.logprobs import chunked_token_logprobs, fused_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")

N, T, H, V = 5, 7, 16, 53


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[0] = False  # an empty row still counts in the sequence normalisers
    mask[1, :3] = True
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (N, T), generator=g)
    adv = torch.randn(N, generator=g)
    adv[2:4] = 0.0  # a zero-advantage group: its tokens skip the gradient matmuls (whole chunks of them, at chunk 4)
    old = torch.where(mask, -torch.rand(N, T, generator=g) * 5, 0.0)  # pi_old, a few nats from the policy
    ref = torch.where(mask, -torch.rand(N, T, generator=g) * 5, 0.0)
    engine = torch.where(mask, old + 0.3 * torch.randn(N, T, generator=g), 0.0)  # some beyond the TIS / MIS band
    return mask, hidden, weight, targets, adv, old, ref, engine


def _leaves(hidden, weight):
    return hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()


@pytest.mark.parametrize("aggregation,surrogate", [("dapo", "clip"), ("grpo", "clip"), ("dr_grpo", "clip"), ("bnpo", "clip"),
                                                   ("dapo", "cispo")])
@pytest.mark.parametrize("beta,correction,with_old", [(0.0, "none", False), (0.04, "tis", True), (0.0, "mis", True),
                                                      (0.1, "tis", False)])
def test_fused_head_loss_and_gradients_equal_the_blocked_head(aggregation, surrogate, beta, correction, with_old):
    mask, hidden, weight, targets, adv, old, ref, engine = _case(3)
    norm = {k: float(v) * 3 for k, v in count_contributions(mask).items()}  # this micro-batch is a third of the step
    norm["max_completion_length"] = T
    sel = mask.nonzero(as_tuple=True)
    settings = {"eps_low": 0.2, "eps_high": 0.28, "beta": beta, "aggregation": aggregation, "normalisers": norm}
    temp = 0.9

    h, w = _leaves(hidden, weight)  # blocked head, dense log-probs, grpo_loss with autograd
    lp, _ = chunked_token_logprobs(h[sel], w, targets[sel], 4, temperature=temp)
    logp = torch.zeros(N, T).index_put(sel, lp)
    o = old if with_old else logp.detach()
    weights = correction_weights(correction, o, engine, mask, 2.0, "token")
    ref_loss, _ = grpo_loss(logp, o, ref, adv, mask, surrogate=surrogate, token_weights=weights, **settings)
    ref_loss.backward()

    hf, wf = _leaves(hidden, weight)  # fused head: the loss's gradient in forward
    token_loss = TokenLoss(mask, adv, old if with_old else None, ref, engine, surrogate=surrogate, correction=correction,
                           correction_cap=2.0, **settings)
    loss, lp_f, _ = fused_token_loss(hf[sel], wf, targets[sel], 4, token_loss, temperature=temp)
    loss.backward()

    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    torch.testing.assert_close(lp_f, lp.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(hf.grad, h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(wf.grad, w.grad, rtol=1e-4, atol=1e-7)
    assert h.grad.abs().max() > 1e-4  # a gradient that can disagree


def test_aggregation_weights_by_hand():
    """DAPO 1 / step tokens; GRPO 1 / (own length x step sequences); Dr. GRPO 1 / (step sequences x max length)."""
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    norm = {"global_tokens": 12.0, "global_sequences": 6.0, "max_completion_length": 3}
    assert torch.equal(aggregation_weights(mask, "dapo", norm), torch.where(mask, 1 / 12, 0.0))
    want = torch.tensor([[1 / 12, 1 / 12, 0], [1 / 6, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(aggregation_weights(mask, "grpo", norm), want)
    torch.testing.assert_close(aggregation_weights(mask, "dr_grpo", norm), torch.where(mask, 1 / 18, 0.0))


def test_fused_head_refuses_what_is_not_separable():
    assert fused_head_problem("token", "tis", "token", False) is None
    assert "importance_level=sequence" in fused_head_problem("sequence", "none", "token", False)
    assert "rollout_correction_level=sequence" in fused_head_problem("token", "tis", "sequence", False)
    assert fused_head_problem("token", "none", "sequence", False) is None  # no correction: the level is unused
    assert "entropy mask" in fused_head_problem("token", "none", "token", True)


def test_no_grad_row_pass_equals_the_fused_forward_bit_for_bit():
    """pi_old's and the reference's log-probs (no grad, `rows=True`) equal the fused head's own bit for bit: at the
    reference the k3 KL gradient is then exactly 0, not rounding noise that Adam amplifies (seen as a 1e-3 gap in
    the gradient norm between micro-batch sizes before); the vocabulary-blocked pass does not round the same."""
    mask, hidden, weight, targets, adv, *_ = _case(5)
    sel = mask.nonzero(as_tuple=True)
    h, w = _leaves(hidden, weight)
    token_loss = TokenLoss(mask, adv, None, None, None, surrogate="clip", correction="none", correction_cap=2.0,
                           eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="dapo", normalisers={"global_tokens": 10.0})
    _, lp_fused, ent_fused = fused_token_loss(h[sel], w, targets[sel], 4, token_loss, temperature=0.7, with_entropy=True)
    with torch.no_grad():
        lp_rows, ent_rows = chunked_token_logprobs(h[sel], w, targets[sel], 4, with_entropy=True, temperature=0.7, rows=True)
        lp_blocks, _ = chunked_token_logprobs(h[sel], w, targets[sel], 4, with_entropy=True, temperature=0.7)
    assert torch.equal(lp_rows, lp_fused) and torch.equal(ent_rows, ent_fused)
    torch.testing.assert_close(lp_blocks, lp_fused, rtol=0, atol=1e-5)


def test_fused_and_blocked_lm_heads_train_the_same_step(tmp_path, sft_tiny):
    """train.lm_head=fused (the loss's gradient inside the head's forward) and blocked (grpo_loss through autograd):
    the same losses, gradient norms, KL and entropies over four optimizer steps of one rollout (mu = 2: pi_old's
    log-probs; KL to the reference; token-level TIS; GRPO's sequence-mean aggregation)."""
    common = [*SMALL, *TOY, "algo=grpo", "algo.reward_workers=1", "logging.progress_bar=false", "checkpoint.export_hf=false",
              "algo.reward_format=1.0", f"model.path={sft_tiny}", "train.max_steps=1", "algo.prompts_per_step=8",
              "algo.group_size=8", "train.global_batch_size=64", "train.micro_batch_size=32", "algo.updates_per_rollout=2",
              "algo.beta=0.04", "algo.loss=grpo", "algo.max_new_tokens=40", "optim.lr=1e-9", "optim.warmup_steps=0"]
    # lr ~ 0: Adam moves every weight by ~lr whatever its gradient, so after one update the two runs' weights would differ
    # wherever a gradient is rounding noise; with lr ~ 0 all four optimizer steps compare gradients of the same weights
    rows = {}
    for head in ("fused", "blocked"):
        run_train([*common, f"run_dir={tmp_path / head}", f"train.lm_head={head}"], nproc=1)
        (rows[head],) = read_metrics(tmp_path / head)
    a, b = rows["fused"], rows["blocked"]
    assert a["reward/mean"] == b["reward/mean"] and a["reward/std"] > 0
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy", "train/clip_frac_high"):
        assert abs(a[key] - b[key]) <= max(1e-5 * max(abs(a[key]), abs(b[key])), 1e-7), (key, a[key], b[key])
    assert a["train/grad_norm"] > 0
