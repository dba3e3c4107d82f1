"""Token log-probabilities and entropy through the LM head, in chunks.

The full logits of a step are [tokens, vocab]: at 2,048 tokens and Qwen2.5's 151,936-entry
vocabulary that is 1.2 GB in fp32 for one sequence, and autograd would keep it for backward. Here
the head runs on `chunk_size` tokens at a time, in fp32 for the softmax, under activation
checkpointing: only the chunk's hidden states are kept, and the chunk's logits are recomputed
during backward. Peak extra memory is one chunk's logits (chunk_size x vocab x 4 bytes, twice).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, with_entropy: bool,
           temperature: float):
    # hidden [n, H], weight [V, H], targets [n] -> logp [n], entropy [n] (or empty)
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [n, V]
    if temperature != 1.0:  # the sampler's distribution: log-probs of logits / T (GRPO ratios)
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, logp.new_empty(0)
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)  # H = log Z - E_p[logit]
    return logp, entropy


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
    Equal to `log_softmax(hidden @ weight.T).gather(targets)` to fp32 precision (tested).
    """
    logps, entropies = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], weight, bias, targets[start : start + chunk_size], with_entropy, temperature)
        if needs_grad:
            logp, ent = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            logp, ent = _chunk(*args)
        logps.append(logp)
        entropies.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)
