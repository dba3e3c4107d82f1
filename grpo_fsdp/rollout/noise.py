"""Counter-based sampling noise: Exp(1) variates as a pure function of where they are used.

The samplers draw token v at decode step t of sequence s by the exponential race (see
`sampler.py`), which needs one Exp(1) variate per (s, t, v). A stateful generator hands
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
published avalanche-tested constant). `mix32` computes it on int64 tensors, where every product stays
below 2^59 (the reference, and the per-row half); the sampler's per-token work runs on int32 tensors whose
multiplication wraps mod 2^32 (`_finalise32_`, the same bits, tested), in place on a few rows at a time
(`exponential_noise_`): about fifteen integer ops and one log per vocabulary entry per step. At B = 64,
V = 151,665 that took the sampling step from 12x to ~1.3x the LM-head matmul of a 128-wide model
(benchmarks/decode_step.py; the allocating version made a fresh [B, V] int64 tensor per operation), and
the int32 arithmetic halved the noise's cost again. Resolution: 23 bits of uniform, so E lies in
[6.0e-8, 16.6] (`E_MIN`, `E_MAX`); tokens below ~1e-7 probability relative to the winner are sampled
slightly less often than exactly, far below anything a GRPO step can see.
"""

from __future__ import annotations

import math

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
    """The per-token half of the hash, [vocab] int32 (the 32 bits of `exponential_noise`'s int64 codes, wrapped):
    computed once per `generate` call, not per step."""
    return _wrap32((torch.arange(vocab, device=device, dtype=torch.int64) * 0x85EBCA6B) & _M32)


# The range of every variate: u = (k + 0.5) / 2^23 for k in [0, 2^23), so E = -log u lies in [E_MIN, E_MAX]
# (rollout/sampler.py drops the tokens these bounds prove cannot win the race)
E_MIN = -math.log1p(-(2.0**-24))  # ~5.96e-8, at u = 1 - 2^-24
E_MAX = 24 * math.log(2.0)  # ~16.64, at u = 2^-24


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def row_codes(streams: torch.Tensor, step: int) -> torch.Tensor:
    """The per-(sequence, step) half of the hash: streams [b] int64 -> [b] int32 (32 bits, wrapped)."""
    return _wrap32(mix32(streams + ((step * _GOLDEN) & _M32)))


# The finaliser on int32 tensors: the same 32-bit arithmetic as `mix32` on int64 (multiplication wraps mod 2^32;
# a logical shift is the arithmetic one masked), at half the bytes and with the CPU's native 32-bit multiply
# (AVX2 has no 64-bit one): the noise costs about half as much (benchmarks/decode_step.py). Tested bit for bit.
def _finalise32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """x (int32, holding row ^ col) <- the 23-bit uniform numerator of `exponential_noise`, in place."""
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
        x.bitwise_xor_(tmp).mul_(_MUL)
    torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
    return x.bitwise_xor_(tmp).bitwise_right_shift_(9).bitwise_and_(0x7FFFFF)


def exponential_noise_at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The variates at given coordinates: rows (`row_codes`, gathered) and cols (`column_codes`, gathered), both
    [K] int32 -> [K] fp32, bit for bit those `exponential_noise` gives at the same (sequence, step, token)."""
    x = rows ^ cols
    k = _finalise32_(x, torch.empty_like(x))
    return k.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 23)).log_().neg_()


def exponential_noise_(out: torch.Tensor, streams: torch.Tensor, step: int, cols: torch.Tensor,
                       scratch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`exponential_noise` written into `out` [b, V] fp32, bit for bit, with no allocation of size V.

    cols: `column_codes(V)` (int32); scratch: two int32 tensors of out's shape (reused across calls). The decode
    loop calls this on a few rows at a time, so the ~15 passes stay in cache (the allocating version above makes
    a fresh [B, V] int64 tensor per operation: at B = 64 and V = 151,665 that is 78 MB each, first-touch page
    faults included)."""
    x, tmp = scratch
    torch.bitwise_xor(row_codes(streams, step)[:, None], cols[None, :], out=x)
    out.copy_(_finalise32_(x, tmp))  # < 2^23: exact in fp32
    return out.add_(0.5).mul_(1.0 / (1 << 23)).log_().neg_()
