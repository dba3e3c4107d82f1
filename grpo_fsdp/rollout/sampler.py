"""One token per row and its log-prob, from a decode step's logits: the sampler of the transformers engines.

Sampling is the exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) iid picks v with probability p_v, the
same distribution as `torch.multinomial` (tested by a chi-square test), and the Gumbel-max trick in another
form (log p_v - log E_v, -log E_v ~ Gumbel). The noise is a pure function of (sequence, step, token)
(`noise.py`), so dropping finished rows, chunking or splitting the batch over ranks does not change any
sequence's samples.

The log-prob is that of the temperature-scaled, untruncated distribution, log_softmax(logits / T) at the sampled
token, also under top-k / top-p (what the trainer's log-probs compute; the truncation only decides which tokens
may be drawn). Greedy (T = 0): log_softmax(logits).

What a step costs beyond the LM head (issue 13). At Qwen2.5's 151,665 tokens every pass over [B, V] counts, so:

- the vocabulary is visited `rows_per_block` rows at a time (~1M entries), in preallocated buffers: no fresh
  [B, V] tensor per operation, and the passes run on a cache-sized block;
- the head's output is read where it lies: no fp32 copy of fp32 logits at T = 1 (a bf16 head or T != 1 gets
  one copy per block), no log_softmax or softmax materialised: the block's max, exp(z - max) into a buffer, its
  sum (the log-normaliser), the sampled token's z read from the logits;
- the noise is drawn only where it can matter. Every Exp(1) variate the counter-based noise yields lies in
  [E_MIN, E_MAX] (E_MIN = -log(1 - 2^-24) ~ 6e-8, E_MAX = -log(2^-24) ~ 16.6), so the row's top token (w = 1)
  races at least 1 / E_MAX, and a token with w_v = exp(z_v - max) below E_MIN / E_MAX can never reach that:
  w_v / E_v <= w_v / E_MIN < 1 / E_MAX. Such tokens are dropped before any noise is computed (with a factor 2
  of margin for rounding), and the race runs on the survivors' coordinates only: the same variates bit for bit
  (`noise.exponential_noise_at`), so the same winner, ties included (first index), as the dense race. A trained
  model's next-token distribution leaves a few hundred survivors of 151,665; a flat one (a random init) leaves
  most, and a block with more than `_SPARSE_SHARE` survivors (judged on every 97th column first, so a flat
  distribution pays ~1% of a pass for the check) runs the dense race instead (equal results).
"""

from __future__ import annotations

import torch

from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.noise import E_MAX, E_MIN, column_codes, exponential_noise_, exponential_noise_at, row_codes

# exp(z - max) below this cannot win the race (module docstring); a factor 2 below the exact bound for rounding
PRUNE_BELOW = 0.5 * E_MIN / E_MAX  # ~1.8e-9: z - max < -20
_SPARSE_SHARE = 0.125  # above this share of survivors in a block the dense race is cheaper


def truncate_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p over what is left: dropped entries set to -inf. scaled [B, V] -> [B, V]."""
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass above it is < top_p
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False  # the most likely token always survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


class Sampler:
    """`sample(logits [B, V] any float dtype, streams [B] int64 | None, step) -> ([B] long, [B] fp32)` for one
    `generate` call's vocabulary; see the module docstring. `prune=False` always runs the dense race (tests)."""

    def __init__(self, sampling: SamplingConfig, vocab: int, device: torch.device, rows_per_block: int | None = None,
                 prune: bool = True):
        self.sampling = sampling
        self.rows = rows_per_block or max(1, (1 << 20) // vocab)  # ~1M entries: 4 MB per fp32 or int32 buffer
        self.cols = None if sampling.greedy else column_codes(vocab, device)
        self.rev = torch.arange(vocab, 0, -1, dtype=torch.float32, device=device)  # V - v
        self.truncate = 0 < sampling.top_k < vocab or sampling.top_p < 1.0
        self.prune = prune
        self.survivors = 0  # tokens that entered the race (summed over calls; tests and benchmarks read it)
        self.raced = 0  # tokens that could have (rows x V)
        self._buf: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, n: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buf.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._buf[name] = torch.empty(max(n, self.rows), vocab, dtype=dtype, device=device)
        return buf[:n]

    def sample(self, logits: torch.Tensor, streams: torch.Tensor | None, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sampling
        if s.greedy:
            tokens = logits.argmax(dim=-1)
            z = logits.float()  # a copy only for a low-precision head
            return tokens, z.gather(-1, tokens[:, None]).squeeze(-1) - z.logsumexp(dim=-1)
        B, V = logits.shape
        dev = logits.device
        tokens = torch.empty(B, dtype=torch.long, device=dev)
        lse = torch.empty(B, dtype=torch.float32, device=dev)
        in_place = logits.dtype == torch.float32 and s.temperature == 1.0 and not self.truncate
        for lo in range(0, B, self.rows):
            hi = min(lo + self.rows, B)
            if in_place:  # read the head's output where it lies
                z = logits[lo:hi]
            else:  # [b, V] fp32: the one copy
                z = self._buffer("z", hi - lo, V, torch.float32, dev).copy_(logits[lo:hi])
                if s.temperature != 1.0:
                    z.div_(s.temperature)
                if self.truncate:  # the log-normaliser of the untruncated distribution, then the cut
                    lse[lo:hi] = torch.logsumexp(z, dim=-1)
                    z.copy_(truncate_logits(z, s.top_k, s.top_p))
            m = z.amax(dim=-1, keepdim=True)  # the top token always survives truncation: finite
            w = torch.sub(z, m, out=self._buffer("w", hi - lo, V, torch.float32, dev)).exp_()  # softmax x its row sum
            if not self.truncate:
                lse[lo:hi] = m.squeeze(-1) + w.sum(dim=-1).log()
            tokens[lo:hi] = self._race(w, streams[lo:hi], step)
        picked = logits.gather(-1, tokens[:, None]).squeeze(-1).float() / s.temperature  # z[token], bit for bit
        return tokens, picked - lse

    def _race(self, w: torch.Tensor, streams: torch.Tensor, step: int) -> torch.Tensor:
        """argmax_v w_v / E_v per row (the first index on ties) -> [b] long; w [b, V] is overwritten."""
        b, V = w.shape
        self.raced += b * V
        # the survivors' share from every 97th column first: a flat distribution goes dense without a full extra pass
        if self.prune and float((w[:, ::97] >= PRUNE_BELOW).sum()) <= _SPARSE_SHARE * b * -(-V // 97):
            rows, cols = (w >= PRUNE_BELOW).nonzero(as_tuple=True)  # ascending: row-major, as the dense argmax reads
            if rows.numel() <= _SPARSE_SHARE * b * V:
                self.survivors += rows.numel()
                noise = exponential_noise_at(row_codes(streams, step)[rows], self.cols[cols])
                race = w[rows, cols].div_(noise)
                best = race.new_full((b,), -1.0).scatter_reduce_(0, rows, race, "amax")
                won = race == best[rows]
                return cols.new_full((b,), V).scatter_reduce_(0, rows[won], cols[won], "amin")
        self.survivors += b * V
        dev = w.device
        noise = self._buffer("noise", b, V, torch.float32, dev)
        scratch = (self._buffer("x", b, V, torch.int32, dev), self._buffer("tmp", b, V, torch.int32, dev))
        exponential_noise_(noise, streams, step, self.cols, scratch)
        race = w.div_(noise)  # p_v / E_v up to the row factor
        best = race.amax(dim=-1, keepdim=True)
        # the first index of the max, as argmax returns it, from vectorised passes (argmax itself runs
        # ~15x slower than amax on the CPU): max over maxima of V - v, exact in fp32 for V < 2^24
        return V - race.eq_(best).mul_(self.rev).amax(dim=-1).long()


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, streams: torch.Tensor | None, step: int = 0):
    """`Sampler(...).sample` for one step (tests, one-off use). logits [B, V] -> ([B] long, [B] fp32)."""
    return Sampler(sampling, logits.shape[-1], logits.device).sample(logits, streams, step)

