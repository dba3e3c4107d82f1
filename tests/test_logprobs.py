"""Chunked token log-probs and entropy equal a full log_softmax gather, values and gradients."""

import math

import pytest
import torch

from grpo_fsdp.logprobs import chunked_token_logprobs


def _reference(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def test_matches_full_log_softmax_values_and_grads():
    torch.manual_seed(0)
    n, h, v = 37, 16, 301  # 37 tokens in chunks of 8: the last chunk is partial
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    logp, ent = chunked_token_logprobs(hidden.float(), weight.float(), targets, chunk_size=8, with_entropy=True)
    ref_logp, ref_ent = _reference(hidden, weight, targets)
    torch.testing.assert_close(logp, ref_logp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=1e-5, atol=1e-5)
    # gradients through the recomputed (checkpointed) chunks
    g_h, g_w = torch.autograd.grad((logp * torch.arange(n)).sum() + ent.sum(), (hidden, weight))
    r_h, r_w = torch.autograd.grad((ref_logp * torch.arange(n)).sum() + ref_ent.sum(), (hidden, weight))
    torch.testing.assert_close(g_h, r_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, r_w, rtol=1e-4, atol=1e-5)


def test_uniform_logits_give_log_vocab():
    # all-zero hidden states: every logit is 0, so log p = -ln V and entropy = ln V exactly
    v = 50
    logp, ent = chunked_token_logprobs(torch.zeros(5, 4), torch.randn(v, 4), torch.arange(5), chunk_size=2, with_entropy=True)
    assert torch.allclose(logp, torch.full((5,), -math.log(v)), atol=1e-6)
    assert torch.allclose(ent, torch.full((5,), math.log(v)), atol=1e-6)


def test_no_entropy_and_empty_input():
    logp, ent = chunked_token_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([1, 2, 3]), chunk_size=2)
    assert ent is None and logp.shape == (3,)
    empty, _ = chunked_token_logprobs(torch.randn(0, 4), torch.randn(7, 4), torch.zeros(0, dtype=torch.long), chunk_size=2)
    assert empty.shape == (0,)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16 vocabulary columns, as small as the head allows, so these small vocabularies span many blocks
    and the online log-sum-exp across blocks is exercised (by default a vocabulary of at most 4,096 tokens is one block)."""
    from grpo_fsdp import logprobs

    monkeypatch.setattr(logprobs, "_ONE_BLOCK_VOCAB", 0)


def _full(hidden, weight, bias, targets, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def test_bias_temperature_and_every_gradient_against_fp64_autograd():
    """Hand-written backward vs autograd through full fp64 logits: hidden, weight and bias grads, T = 0.7,
    a loss on log-probs and entropies with different weights per token."""
    torch.manual_seed(1)
    n, h, v, temp = 29, 8, 97, 0.7
    leaves = [torch.randn(n, h, dtype=torch.float64, requires_grad=True), torch.randn(v, h, dtype=torch.float64, requires_grad=True),
              torch.randn(v, dtype=torch.float64, requires_grad=True)]
    targets = torch.randint(0, v, (n,))
    wl, we = torch.randn(n), torch.randn(n)
    hid, w, b = (x.float().detach().requires_grad_() for x in leaves)
    logp, ent = chunked_token_logprobs(hid, w, targets, chunk_size=6, bias=b, with_entropy=True, temperature=temp)
    ((logp * wl).sum() + (ent * we).sum()).backward()
    ref_logp, ref_ent = _full(*leaves, targets, temp)
    ((ref_logp * wl.double()).sum() + (ref_ent * we.double()).sum()).backward()
    torch.testing.assert_close(logp, ref_logp.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=0, atol=1e-5)
    for mine, ref in zip((hid, w, b), leaves):
        torch.testing.assert_close(mine.grad, ref.grad.float(), rtol=1e-4, atol=1e-5)


def test_unused_entropy_gets_no_gradient_and_logp_only_grads_match():
    torch.manual_seed(2)
    hid = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (11,))
    logp, _ = chunked_token_logprobs(hid, w, targets, chunk_size=4, with_entropy=True)
    logp.sum().backward()  # the entropy is only logged, as in training
    ref_h, ref_w = hid.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _full(ref_h, ref_w, None, targets, 1.0)[0].sum().backward()
    torch.testing.assert_close(hid.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)


def test_bf16_head_gradients_keep_their_dtype_and_match_fp64():
    """bf16 head over 32 chunks: gradients come back in bf16 and within bf16 logit rounding of fp64 autograd."""
    torch.manual_seed(3)
    hid64, w64 = torch.randn(64, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    targets = torch.randint(0, 32, (64,))
    hid, w = hid64.bfloat16().requires_grad_(), w64.bfloat16().requires_grad_()
    chunked_token_logprobs(hid, w, targets, chunk_size=2)[0].sum().backward()
    ref_w = w.detach().double().requires_grad_()
    _full(hid.detach().double(), ref_w, None, targets, 1.0)[0].sum().backward()
    assert w.grad.dtype == torch.bfloat16 and hid.grad.dtype == torch.bfloat16
    rel = (w.grad.double() - ref_w.grad).norm() / ref_w.grad.norm()
    assert rel < 1e-2, rel  # measured 4e-3: the bf16 rounding of the logits and of the result


def test_running_max_rescaling_across_vocabulary_blocks():
    """Logits that grow block after block (each block's max beats the last by ~40 nats, so earlier blocks'
    exp sums must be rescaled or they swamp the result): values, entropy and gradients against fp64 autograd.
    64 tokens, chunk 4 -> blocks of 16 columns over V = 80."""
    torch.manual_seed(4)
    n, h, v = 64, 8, 80
    ramp = torch.linspace(0, 3, v, dtype=torch.float64)[:, None]  # later rows of W: larger logits
    w64 = (torch.randn(v, h, dtype=torch.float64) * 0.3 + ramp).requires_grad_()
    h64 = (torch.randn(n, h, dtype=torch.float64).abs() * 4).requires_grad_()
    targets = torch.randint(0, v, (n,))
    hid, w = h64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    logp, ent = chunked_token_logprobs(hid, w, targets, chunk_size=4, with_entropy=True)
    ref_logp, ref_ent = _full(h64, w64, None, targets, 1.0)
    assert (ref_logp < -30).any()  # some targets sit in blocks far below the final max
    torch.testing.assert_close(logp, ref_logp.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=0, atol=1e-4)
    wl = torch.randn(n)
    ((logp * wl).sum() + ent.sum()).backward()
    ((ref_logp * wl.double()).sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(hid.grad, h64.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_entropy,frozen_head", [(False, False), (True, False), (True, True)])
def test_fused_token_loss_matches_autograd_through_full_logits(with_entropy, frozen_head):
    """issue 13 item 3: the head's gradients computed in forward from a per-token loss gradient (a PPO-like term
    a_t exp(logp_t - old_t), non-linear in logp) equal fp64 autograd through full logits, with bias and T = 0.8;
    the loss, log-probs and entropies match too, an upstream gradient of 2 doubles every gradient, and a frozen
    head (LoRA) gets no gradient while hidden's is unchanged."""
    from grpo_fsdp.logprobs import fused_token_loss

    torch.manual_seed(5)
    n, h, v, temp = 23, 8, 61, 0.8
    leaves = [torch.randn(n, h, dtype=torch.float64, requires_grad=True), torch.randn(v, h, dtype=torch.float64, requires_grad=True),
              torch.randn(v, dtype=torch.float64, requires_grad=True)]
    targets, a, old = torch.randint(0, v, (n,)), torch.randn(n, dtype=torch.float64), -torch.rand(n, dtype=torch.float64) * 4

    def token_grad(lp, lo, hi):
        lp = lp.detach().double().requires_grad_()
        term = (a[lo:hi] * torch.exp(lp - old[lo:hi])).sum()
        return term.detach().float(), torch.autograd.grad(term, lp)[0]

    hid, w, b = (x.float().detach().requires_grad_() for x in leaves)
    if frozen_head:
        w.requires_grad_(False)
        b.requires_grad_(False)
    loss, logp, ent = fused_token_loss(hid, w, targets, 7, token_grad, bias=b, temperature=temp, with_entropy=with_entropy)
    (2 * loss).backward()
    ref_logp, ref_ent = _full(*leaves, targets, temp)
    ref = (a * torch.exp(ref_logp - old)).sum()
    (2 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(logp, ref_logp.float(), rtol=0, atol=1e-5)
    if with_entropy:
        torch.testing.assert_close(ent, ref_ent.float(), rtol=0, atol=1e-5)
    else:
        assert ent is None
    for mine, r in zip((hid, w, b), leaves):
        if frozen_head and mine is not hid:
            assert mine.grad is None
        else:
            torch.testing.assert_close(mine.grad, r.grad.float(), rtol=1e-4, atol=1e-5)


def test_bf16_rows_with_no_gradient_get_zero_gradients_in_their_dtype():
    """Only the rows with a nonzero upstream gradient go through the head's backward; a micro-batch with none
    (every token masked, zero advantage or clipped) must still hand back grad_h in hidden's dtype (a bf16 run
    failed here at index_copy_ with an fp32 source)."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    logp, _ = chunked_token_logprobs(hidden, weight, targets, chunk_size=4)
    (logp * torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])).sum().backward()  # two live rows
    assert hidden.grad.dtype == torch.bfloat16 and (hidden.grad[[0, 2, 3, 5]] == 0).all()
    assert (hidden.grad[[1, 4]] != 0).any()
    hidden.grad = weight.grad = None
    logp, _ = chunked_token_logprobs(hidden, weight, targets, chunk_size=4)
    (logp * 0.0).sum().backward()  # no live row
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert not hidden.grad.any() and not weight.grad.any()
