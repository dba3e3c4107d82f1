"""Counter-based sampling noise: Exp(1) variates as a pure function of where they are used.

The samplers draw token v at decode step t of sequence s by the exponential race (see
`hf.sample_next`), which needs one Exp(1) variate per (s, t, v). A stateful generator hands
these out in call order, so a sequence's samples would change whenever the batch around it
changes: another rank split, another micro-batch or chunk size, finished rows leaving the batch.
Here the variate is a hash of its coordinates instead (the idea of counter-based generators such
as Philox, Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):

    stream(seed, key, j)  one 32-bit stream id per sequence: completion j of the prompt with key `key`
    u(stream, t, v)       uniform in (0, 1) from a 32-bit integer hash of (stream, t, v)
    E = -log(u)           Exp(1)

So the j-th completion of a prompt depends only on (seed, the prompt's key, j), the weights and
the device numerics: a 1-process run and a 2-process run sample the same rollout, and so do two
engines that batch differently.

The mixing function is the 32-bit finaliser "x ^= x >> 16; x *= 0x45d9f3b" applied twice (a
published avalanche-tested constant); every product stays below 2^59, so int64 tensors never
overflow on any device. Cost: about ten integer ops and one log per vocabulary entry per step; the
sampler runs them in place on a few rows at a time (`exponential_noise_`, same bits), which at
B = 64, V = 151,665 took the whole sampling step from 12x to ~1.3x the LM-head matmul of a
128-wide model (benchmarks/decode_step.py; the allocating version made a fresh [B, V] int64 tensor
per operation). Resolution: 23 bits of uniform, so E lies in
[1.2e-7, 16.6]; tokens below ~1e-7 probability relative to the winner are sampled slightly less
often than exactly, far below anything a GRPO step can see.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^27: x (< 2^32) * _MUL < 2^59 fits int64
_GOLDEN = 0x9E3779B9  # 2^32 / phi, spreads consecutive counters before mixing


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche hash of 32-bit values held in int64 tensors (any shape)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    return int(mix32(torch.tensor(x & _M32, dtype=torch.int64)))


def stream_ids(seed: int, keys: list[int], sample_index: list[int]) -> list[int]:
    """One 32-bit stream id per sequence, from the call's seed, its prompt's key and its index j in the group."""
    base = _mix_int(_mix_int(seed & _M32) ^ _mix_int((seed >> 32) & _M32))
    k = mix32(torch.tensor(keys, dtype=torch.int64) ^ base)
    return mix32(k ^ mix32(torch.tensor(sample_index, dtype=torch.int64) * 0x27D4EB2F)).tolist()


def exponential_noise(streams: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Exp(1) noise for decode step `step` of each sequence: streams [B] int64 -> [B, vocab] fp32."""
    row = mix32(streams + ((step * _GOLDEN) & _M32))  # [B]
    col = torch.arange(vocab, device=streams.device, dtype=torch.int64) * 0x85EBCA6B  # < 2^50
    h = mix32(row[:, None] ^ (col[None, :] & _M32))  # [B, V]
    u = ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # (0, 1), exact in fp32
    return -torch.log(u)


def column_codes(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The per-token half of the hash, [vocab] int64: computed once per `generate` call, not per step."""
    return (torch.arange(vocab, device=device, dtype=torch.int64) * 0x85EBCA6B) & _M32


def exponential_noise_(out: torch.Tensor, streams: torch.Tensor, step: int, cols: torch.Tensor,
                       scratch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`exponential_noise` written into `out` [b, V] fp32, bit for bit, with no allocation of size V.

    cols: `column_codes(V)`; scratch: two int64 tensors of out's shape (reused across calls). The
    decode loop calls this on a few rows at a time, so the ~20 passes stay in cache (the
    allocating version above makes a fresh [B, V] int64 tensor per operation: at B = 64 and
    V = 151,665 that is 78 MB each, first-touch page faults included)."""
    x, tmp = scratch
    row = mix32(streams + ((step * _GOLDEN) & _M32))  # [b]
    torch.bitwise_xor(row[:, None], cols[None, :], out=x)  # both < 2^32: the first mask of mix32 is a no-op
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=tmp)
        x.bitwise_xor_(tmp).mul_(_MUL).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp).bitwise_right_shift_(9)
    out.copy_(x)  # < 2^23: exact in fp32
    return out.add_(0.5).mul_(1.0 / (1 << 23)).log_().neg_()
