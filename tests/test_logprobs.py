"""Chunked token log-probs and entropy equal a full log_softmax gather, values and gradients."""

import math

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
