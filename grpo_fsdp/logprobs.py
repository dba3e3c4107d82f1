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

Backward takes only the tokens whose upstream gradient is not exactly 0: under the entropy mask
(algo.entropy_top_quantile, algorithms/entropy_mask.py; issue 16) the dropped tokens' log-probs get
a zero gradient when no KL term reads them, so the head's backward (three matmuls of N x V x H per
step: the logits' recompute, grad_h, grad_w) shrinks to the kept fraction of N, exactly (tested by
counting FLOPs). Zero-advantage and clipped tokens are skipped the same way.

`fused_token_loss` (issue 13 item 3) is the other pattern, for a loss that is a sum of per-token terms of
each token's own log-prob (GRPO's token-level ratio and k3 KL are; GSPO's sequence ratio is not): the
caller's per-token gradient is applied in forward, chunk by chunk of tokens (Liger's fused linear
cross-entropy), so the logits are computed once: 3 matmuls instead of 4, at the price of an fp32
[V, H] gradient accumulator held from forward to backward. Measured in benchmarks/logprobs_memory.py
(variants f<n>); the GRPO recipe uses it wherever its loss is separable (train.lm_head=auto).
"""

from __future__ import annotations

import torch

_MIN_BLOCK = 16  # vocabulary columns per block at least, however many tokens
_ONE_BLOCK_VOCAB = 4096  # a vocabulary this small is one block (<= 16 KB a token), so its rounding does not depend
# on how many tokens a micro-batch holds (1 vs 2 ranks, micro-batch sizes give the same log-probs bit for bit)


def _block_columns(n_tokens: int, vocab: int, chunk_size: int) -> int:
    """Columns of one [N, c] block holding as many logits as `chunk_size` tokens x the whole vocabulary."""
    if vocab <= _ONE_BLOCK_VOCAB:
        return vocab
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
        use_ent = ctx.with_entropy and g_ent is not None
        # dz/d(hW^T + b) = 1/T, folded into the upstream gradients (every term is linear in them)
        g = lse.new_zeros(lse.shape) if g_logp is None else g_logp.float() / ctx.temperature
        ge = g_ent.float() / ctx.temperature if use_ent else None
        # Rows whose upstream gradients are all exactly 0 add nothing to any gradient: tokens the entropy mask
        # drops (algorithms/entropy_mask.py, when no KL term reads them), zero-advantage and clipped tokens. Only the
        # others go through the three matmuls (the cost is one nonzero(), a device sync on CUDA, and a gather).
        live = (g != 0) if ge is None else (g != 0) | (ge != 0)
        rows = None if bool(live.all()) else live.nonzero().squeeze(1)
        if rows is not None:
            hidden_live, targets, lse, g = hidden[rows], targets[rows], lse[rows], g[rows]
            ent, ge = (ent[rows], ge[rows]) if use_ent else (ent, ge)
        else:
            hidden_live = hidden
        grad_h, grad_w, grad_b = _backward_blocks(hidden_live, weight, bias, targets, lse, ent, g, ge, ctx.chunk_size,
                                                  ctx.temperature, need_h, need_w, need_b)
        if need_h and rows is not None:
            grad_h = hidden.new_zeros(hidden.shape).index_copy_(0, rows, grad_h)
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _backward_blocks(hidden, weight, bias, targets, lse, ent, g, ge, chunk_size, temperature, need_h, need_w, need_b):
    """The head's gradients from N rows' upstream gradients g (of log p, / T) and ge (of H, / T, or None).

    -> (grad_h [N, H] in hidden's dtype | None, grad_w [V, H] in weight's dtype | None, grad_b [V] fp32 | None).
    Three [N, c] x [c, H]-sized matmuls per vocabulary block: the logits' recompute, grad_h and grad_w.
    """
    N, V = hidden.shape[0], weight.shape[0]
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    grad_b = torch.empty(V, dtype=torch.float32, device=weight.device) if need_b else None
    if N == 0:  # no live row: every gradient is exactly 0
        return (None if grad_h is None else grad_h.to(hidden.dtype)), (None if grad_w is None else grad_w.zero_()), \
            (None if grad_b is None else grad_b.zero_())
    h32 = hidden.float()
    c = _block_columns(N, V, chunk_size)
    buf = torch.empty(N * c, dtype=torch.float32, device=hidden.device)
    buf2 = torch.empty_like(buf) if ge is not None else None
    rows = torch.arange(N, device=hidden.device)
    for lo in range(0, V, c):
        hi = min(lo + c, V)
        w_blk = weight[lo:hi]
        logq = _logits_into(_block(buf, N, hi - lo), hidden, w_blk, None if bias is None else bias[lo:hi],
                            temperature).sub_(lse[:, None])  # [N, c] log p
        if ge is not None:  # dz = -p (g + ge (log p + H)) + g 1[j = t]
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
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets | hidden) and, optionally, the entropy of each token's distribution.

    rows: without autograd, compute by token chunks of whole rows (`row_token_logprobs`), the fused head's
    arithmetic, instead of vocabulary blocks.

    hidden [N, H] (any float dtype), weight [V, H], targets [N] long -> (logp [N] fp32, entropy [N] fp32 | None).
    chunk_size: the logits held at once are those of `chunk_size` tokens over the whole vocabulary
    (as [N, chunk_size x V / N] blocks; twice that with entropy). Equal to
    `log_softmax(hidden @ weight.T).gather(targets)` to fp32 precision, values and gradients (tested).
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if rows and not needs_grad:
        return row_token_logprobs(hidden, weight, targets, chunk_size, bias, with_entropy, temperature)
    if needs_grad:
        logp, ent = _BlockedHead.apply(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
    else:
        logp, ent, _ = _forward_blocks(hidden, weight, bias, targets, chunk_size, temperature, with_entropy)
    return logp, (ent if with_entropy else None)


def _row_stats(z: torch.Tensor, t: torch.Tensor, ent_buf: torch.Tensor | None):
    """One token chunk's full rows of logits z [c, V] fp32 (overwritten) -> (logp [c], entropy [c] | None,
    e = exp(z - max) [c, V] (in z, or in ent_buf with entropy), its row sums). The one arithmetic of the fused
    head's forward and of `row_token_logprobs`, so that pi_old's and the reference's log-probs equal the trained
    ones bit for bit when the weights do (the k3 KL gradient is then exactly 0 at the reference, as in the blocked
    path, instead of rounding noise that Adam would amplify)."""
    z_t, m = z.gather(-1, t[:, None]).squeeze(-1), z.amax(dim=-1)
    y = z.sub_(m[:, None])  # z - m
    ent = None
    if ent_buf is not None:  # H = log s - sum e y / s, e = exp(z - m), s = sum e
        e = torch.exp(y, out=ent_buf)
        total = e.sum(dim=-1)
        ent = total.log() - y.mul_(e).sum(dim=-1) / total
    else:
        e = y.exp_()  # one exp per logit, in place
        total = e.sum(dim=-1)
    return z_t - (m + total.log()), ent, e, total  # log p(t) = z_t - logsumexp(z), as _forward_blocks rounds it


def row_token_logprobs(hidden, weight, targets, chunk_size: int, bias=None, with_entropy: bool = False,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs (and entropies) by token chunks of full vocabulary rows: the fused head's forward without
    its gradient (the policy's no-grad passes when it trains with the fused head). -> (logp [N], entropy [N] | None)."""
    N, V = hidden.shape[0], weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(N, dtype=torch.float32, device=hidden.device) if with_entropy else None
    c = max(1, min(chunk_size, N))
    buf = torch.empty(c * V, dtype=torch.float32, device=hidden.device)
    buf2 = torch.empty_like(buf) if with_entropy else None
    for lo in range(0, N, c):
        hi = min(lo + c, N)
        z = _logits_into(_block(buf, hi - lo, V), hidden[lo:hi], weight, bias, temperature)
        lp, e, _, _ = _row_stats(z, targets[lo:hi], None if buf2 is None else _block(buf2, hi - lo, V))
        logp[lo:hi] = lp
        if with_entropy:
            ent[lo:hi] = e
    return logp, ent


class _FusedHeadLoss(torch.autograd.Function):
    """Liger's pattern: the loss's gradient is known per token in forward, so each token chunk's [c, V] logits are
    computed once and turned into grad_h and grad_W on the spot (3 matmuls of N x V x H in all, as full logits;
    the blocked head above needs 4 since its upstream gradient arrives only in backward). As there, tokens whose
    gradient is exactly 0 skip the two gradient matmuls: 1 + 2 x (live share) matmuls against 1 + 3 x (live share)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, temperature: float, token_grad, with_entropy: bool):
        N, dev = hidden.shape[0], hidden.device
        need_h, need_w, need_b = ctx.needs_input_grad[:3]  # a frozen head (LoRA) gets no [V, H] accumulator
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=weight.device) if need_b else None
        logp = torch.empty(N, dtype=torch.float32, device=dev)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        c = max(1, min(chunk_size, N))
        buf = torch.empty(c * weight.shape[0], dtype=torch.float32, device=dev)
        buf2 = torch.empty_like(buf) if with_entropy else None
        for lo in range(0, N, c):
            hi = min(lo + c, N)
            h, t = hidden[lo:hi], targets[lo:hi]
            z = _logits_into(_block(buf, hi - lo, weight.shape[0]), h, weight, bias, temperature)  # [c, V], in place
            lp, h_ent, e, total = _row_stats(z, t, None if buf2 is None else _block(buf2, hi - lo, weight.shape[0]))
            if with_entropy:
                ent[lo:hi] = h_ent
            with torch.enable_grad():  # forward runs under no_grad; token_grad may use autograd on its [c] terms
                part, g = token_grad(lp, lo, hi)  # this chunk's loss and d loss / d logp, [c]
            loss += part.detach()
            logp[lo:hi] = lp
            g = g.float() / temperature
            # only tokens with a nonzero gradient go on (zero-advantage groups, clipped tokens: often most of a step)
            live = g != 0
            if not bool(live.all()):
                rows = live.nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                e, total, g, t, h = e[rows], total[rows], g[rows], t[rows], h[rows]
            else:
                rows = None
            dz = e.mul_((-g / total)[:, None])  # -g p, in place
            dz[torch.arange(dz.shape[0], device=dev), t] += g
            if need_h:
                gh = dz @ weight if weight.dtype == torch.float32 else dz.to(weight.dtype) @ weight  # no fp32 W copy
                if rows is None:
                    grad_h[lo:hi] = gh
                else:
                    grad_h[lo + rows] = gh.float()
            if need_w:
                grad_w.addmm_(dz.t(), h.float())
            if need_b:
                grad_b += dz.sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if have else None for have in ctx.have]
        # in place: a second fp32 [V, H] buffer would double the head's peak (backward runs once: retain_graph unsupported)
        out = [None if x is None else x.mul_(g_loss).to(dt) for x, dt in zip(grads, ctx.dtypes)]
        return (*out, None, None, None, None, None)


def fused_token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, token_grad,
                     bias: torch.Tensor | None = None, temperature: float = 1.0, with_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loss that is a sum of per-token terms of log p(target), with its head gradients computed in forward.

    hidden [N, H], weight [V, H], targets [N] -> (loss scalar with grad into hidden/weight/bias, logp [N] detached,
    entropy [N] detached | None). token_grad(logp_chunk [c] fp32, lo, hi) -> (that chunk's loss terms summed, their
    gradient in logp [c]). Holds one [chunk_size, V] fp32 logits buffer (two with entropy) and, when the head
    trains, an fp32 [V, H] weight-gradient accumulator from forward to backward. Separable losses only (each
    token's term reads its own log-prob): GRPO's token-level ratio with k3 KL is; GSPO's sequence ratio and the
    entropy mask are not (`algorithms/grpo.py: fused_head_problem`). Used by the GRPO recipe (train.lm_head).
    """
    loss, logp, ent = _FusedHeadLoss.apply(hidden, weight, bias, targets, chunk_size, temperature, token_grad, with_entropy)
    return loss, logp, (ent if with_entropy else None)
