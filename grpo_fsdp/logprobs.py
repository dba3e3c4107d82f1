"""Token log-probabilities and entropy through the LM head, in blocks of the vocabulary, with a hand-written backward.

The full logits of a step are [tokens, vocab]: at 2,048 tokens and Qwen2.5's 151,936-entry
vocabulary that is 1.2 GB in fp32 for one sequence, and autograd would keep it (and its softmax)
for backward. Here the head runs on one block of vocabulary columns at a time, for all N tokens
at once ([N, c] logits, c = chunk_size x V / N: the same number of logits as `chunk_size` whole
rows), and keeps nothing but each token's log-normaliser (and entropy):

    forward   per block: z = h W_c^T / T, the target's logit if it falls in the block, and a
              running (online) log-sum-exp and sum of p z, rescaled when the running max grows
              (the one-pass softmax of Milakov & Gimelshein 2018, used by FlashAttention)
    backward  per block: the block's logits recomputed, dz = the gradient of the loss in z, then
              grad_h += dz W_c and grad_W[c] = dz^T h: each row block of the weight gradient is
              written once from all N tokens (K = N in the matmul), in the weight's dtype

Blocking the vocabulary rather than the tokens is the pattern of Cut Cross-Entropy (Wijmans et
al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"); token chunks (this module
until issue 13, and Liger's fused linear cross-entropy) instead add every chunk's [V, H]
contribution into one fp32 weight-gradient buffer: N / chunk read-modify-writes of 932 MB at
V = 151,665, H = 1,536 and skinny K = chunk matmuls. The logits are still computed twice (forward
and backward): the upstream gradient of each token's log-prob is not known in forward (the GRPO
loss is a function of all of them), so the fused forward+backward of a plain cross-entropy loss
does not apply; keeping the logits instead would cost the [N, V] memory this module exists to avoid.

For target t_i of token i, with z = (h W^T + b) / T and p = softmax(z):

    log p(t_i) = z_{t_i} - logsumexp(z)          d/dz_j = 1[j = t_i] - p_j
    H_i        = -sum_j p_j log p_j               d/dz_j = -p_j (log p_j + H_i)

and dz/d(hW^T + b) = 1/T. Hidden and bias gradients accumulate in fp32 and are cast once.
"""

from __future__ import annotations

import torch

_MIN_BLOCK = 16  # vocabulary columns per block at least, however many tokens


def _block_columns(n_tokens: int, vocab: int, chunk_size: int) -> int:
    """Columns of one [N, c] block holding as many logits as `chunk_size` tokens x the whole vocabulary."""
    return min(vocab, max(_MIN_BLOCK, chunk_size * vocab // max(n_tokens, 1)))


def _block(buf: torch.Tensor, n: int, c: int) -> torch.Tensor:
    return buf[: n * c].view(n, c)  # contiguous, so a matmul can write into it


def _logits_into(out: torch.Tensor, hidden, weight, bias, temperature: float) -> torch.Tensor:
    """out [N, c] fp32 <- (hidden @ weight.T + bias) / T, written in place when the head is fp32."""
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden, weight.t(), out=out)
    else:
        out.copy_(torch.nn.functional.linear(hidden, weight, bias))
    return out.div_(temperature) if temperature != 1.0 else out


def _forward_blocks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy):
    """-> logp [N], entropy [N] (or empty), lse [N]: one pass over the vocabulary, keeping nothing of size V."""
    N, V = hidden.shape[0], weight.shape[0]
    empty = hidden.new_zeros(0, dtype=torch.float32)
    if N == 0:
        return empty, empty, empty
    c = _block_columns(N, V, chunk_size)
    buf = torch.empty(N * c, dtype=torch.float32, device=hidden.device)
    buf2 = torch.empty_like(buf) if with_entropy else None
    m = s = t = None  # running max, sum exp(z - m), sum exp(z - m) (z - m)
    z_target = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    for lo in range(0, V, c):
        hi = min(lo + c, V)
        z = _logits_into(_block(buf, N, hi - lo), hidden, weight[lo:hi], None if bias is None else bias[lo:hi], temperature)
        inside = (targets >= lo) & (targets < hi)
        picked = z.gather(-1, (targets - lo).clamp(0, hi - lo - 1)[:, None]).squeeze(-1)
        z_target = torch.where(inside, picked, z_target)
        new_m = z.amax(dim=-1) if m is None else torch.maximum(m, z.amax(dim=-1))
        y = z.sub_(new_m[:, None])  # z - m'
        if with_entropy:
            e = torch.exp(y, out=_block(buf2, N, hi - lo))
            e_sum = e.sum(dim=-1)
            ey_sum = e.mul_(y).sum(dim=-1)
        else:
            e_sum = y.exp_().sum(dim=-1)
        if m is None:
            s, t = e_sum, (ey_sum if with_entropy else None)
        else:
            scale = torch.exp(m - new_m)
            if with_entropy:  # the old terms: sum e (z - m') = scale (t + (m - m') s)
                t = scale * (t + (m - new_m) * s) + ey_sum
            s = scale * s + e_sum
        m = new_m
    log_s = s.log()
    lse = m + log_s
    ent = log_s - t / s if with_entropy else empty  # H = lse - E_p[z] = log s - E_p[z - m]
    return z_target - lse, ent, lse


class _BlockedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, temperature: float, with_entropy: bool):
        logp, ent, lse = _forward_blocks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.chunk_size, ctx.temperature, ctx.with_entropy = chunk_size, temperature, with_entropy
        ctx.set_materialize_grads(False)  # an unused output (the logged entropy) costs nothing in backward
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = hidden.shape[0], weight.shape[0]
        use_ent = ctx.with_entropy and g_ent is not None
        # dz/d(hW^T + b) = 1/T, folded into the upstream gradients (every term is linear in them)
        g = lse.new_zeros(lse.shape) if g_logp is None else g_logp.float() / ctx.temperature
        ge = g_ent.float() / ctx.temperature if use_ent else None
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        grad_b = torch.empty(V, dtype=torch.float32, device=weight.device) if need_b else None
        h32 = hidden.float()
        c = _block_columns(N, V, ctx.chunk_size)
        buf = torch.empty(N * c, dtype=torch.float32, device=hidden.device)
        buf2 = torch.empty_like(buf) if use_ent else None
        rows = torch.arange(N, device=hidden.device)
        for lo in range(0, V, c):
            hi = min(lo + c, V)
            w_blk = weight[lo:hi]
            logq = _logits_into(_block(buf, N, hi - lo), hidden, w_blk, None if bias is None else bias[lo:hi],
                                ctx.temperature).sub_(lse[:, None])  # [N, c] log p
            if use_ent:  # dz = -p (g + ge (log p + H)) + g 1[j = t]
                p = torch.exp(logq, out=_block(buf2, N, hi - lo))
                dz = p.mul_(logq.add_(ent[:, None]).mul_(ge[:, None]).add_(g[:, None])).neg_()
            else:  # dz = -g p + g 1[j = t]
                dz = logq.exp_().mul_(-g[:, None])
            inside = (targets >= lo) & (targets < hi)
            dz.index_put_((rows[inside], targets[inside] - lo), g[inside], accumulate=True)
            if need_h:
                if weight.dtype == torch.float32:
                    grad_h.addmm_(dz, w_blk)
                else:
                    grad_h.add_(dz.to(weight.dtype) @ w_blk)
            if need_w:  # written once per row block, from all N tokens
                if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
                    torch.mm(dz.t(), h32, out=grad_w[lo:hi])
                else:
                    grad_w[lo:hi] = (dz.t() @ h32).to(weight.dtype)
            if need_b:
                grad_b[lo:hi] = dz.sum(0)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
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
    chunk_size: the logits held at once are those of `chunk_size` tokens over the whole vocabulary
    (as [N, chunk_size x V / N] blocks; twice that with entropy). Equal to
    `log_softmax(hidden @ weight.T).gather(targets)` to fp32 precision, values and gradients (tested).
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        logp, ent = _BlockedHead.apply(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
    else:
        logp, ent, _ = _forward_blocks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
    return logp, (ent if with_entropy else None)
