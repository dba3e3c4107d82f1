"""Token log-probabilities and entropy through the LM head, in chunks, with a hand-written backward.

The full logits of a step are [tokens, vocab]: at 2,048 tokens and Qwen2.5's 151,936-entry
vocabulary that is 1.2 GB in fp32 for one sequence, and autograd would keep it (and its softmax)
for backward. Here the head runs on `chunk_size` tokens at a time and keeps nothing but each
token's log-normaliser; backward recomputes one chunk's logits at a time and writes the head's
weight gradient into one [V, H] fp32 buffer (`addmm_`). Activation checkpointing of each chunk,
which this replaces, let autograd allocate a fresh [V, H] gradient per chunk and add it to the
running sum: 1.8 GB above the gradients at V = 151,665, H = 1,536, chunk 256 (measured,
benchmarks/logprobs_memory.py). Peak extra memory is now a few chunk-sized [n, V] fp32 tensors.

For target t_i of token i, with z = (h W^T + b) / T and p = softmax(z):

    log p(t_i) = z_{t_i} - logsumexp(z)          d/dz_j = 1[j = t_i] - p_j
    H_i        = -sum_j p_j log p_j               d/dz_j = -p_j (log p_j + H_i)

and dz/d(hW^T + b) = 1/T. The weight and bias gradients accumulate in fp32 and are cast to the
weight's dtype once (autograd would add bf16 chunk gradients in bf16).
"""

from __future__ import annotations

import torch


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    z = torch.nn.functional.linear(hidden, weight, bias).float()  # [n, V]
    return z / temperature if temperature != 1.0 else z


def _forward_chunks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy):
    """-> logp [N], entropy [N] (or empty), lse [N]: the forward pass, keeping nothing of size V."""
    logps, ents, lses = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        z = _logits(hidden[start : start + chunk_size], weight, bias, temperature)  # [n, V]
        lse = torch.logsumexp(z, dim=-1)  # [n]
        logps.append(z.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1) - lse)
        if with_entropy:
            ents.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))  # H = log Z - E_p[z]
        lses.append(lse)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return tuple(torch.cat(xs) if xs else empty for xs in (logps, ents, lses))


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, temperature: float, with_entropy: bool):
        logp, ent, lse = _forward_chunks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.chunk_size, ctx.temperature, ctx.with_entropy = chunk_size, temperature, with_entropy
        ctx.set_materialize_grads(False)  # an unused output (the logged entropy) costs nothing in backward
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        use_ent = ctx.with_entropy and g_ent is not None
        if g_logp is None:
            g_logp = lse.new_zeros(lse.shape)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]
            logq = _logits(h, weight, bias, ctx.temperature).sub_(lse[sl, None])  # [n, V] log p
            p = logq.exp()
            dz = p * (-g_logp[sl, None])  # d logp / dz = onehot - p
            dz.scatter_add_(-1, targets[sl, None], g_logp[sl, None])
            if use_ent:  # dH / dz = -p (log p + H)
                dz.sub_(p.mul_(logq.add_(ent[sl, None])).mul_(g_ent[sl, None]))
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            if need_h:
                grad_h[sl] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), h.float())
            if need_b:
                grad_b.add_(dz.sum(0))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets | hidden) and, optionally, the entropy of each token's distribution.

    hidden [N, H] (any float dtype), weight [V, H], targets [N] long -> (logp [N] fp32, entropy [N] fp32 | None).
    Equal to `log_softmax(hidden @ weight.T).gather(targets)` to fp32 precision, values and gradients (tested).
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        logp, ent = _ChunkedHead.apply(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
    else:
        logp, ent, _ = _forward_chunks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
    return logp, (ent if with_entropy else None)
