"""4-bit NF4 base weights under LoRA (QLoRA, Dettmers et al. 2023), with torchao's `NF4Tensor`.

`quantize_base_nf4(model, hw)` turns the frozen `weight` of every `LoRALinear` (lora.py) into an NF4 tensor:
blocks of 64 values share an absmax scale, each value is the nearest of NF4's 16 levels (quantiles of a
normal distribution), and the scales themselves are quantized to int8 in blocks (double quantization,
after subtracting their mean). 4.5 bits per weight instead of 16. Embeddings, norms, the LM head and
the adapters stay as they are.

torchao's NF4 is plain PyTorch (runs on the CPU) and implements FSDP2's all-gather hooks, so a
`fully_shard`ed NF4 weight is sharded and all-gathered in its packed form; each shard is a whole number of
scale blocks and dequantizes on its own. Two rules follow, both checked here:

- the weight is quantized whole, before `fully_shard`, never shard by shard: double quantization subtracts
  the mean of all the tensor's scales, so per-shard quantization would depend on the world size;
- the scale blocks must split evenly over the ranks. The scaler block is 256 scales (torchao's default)
  when the tensor has enough blocks, else the largest power of two for which the tensor has at least
  `SHARD_SPLITS` (8) of them: the quantization never depends on the world size, and any world size
  dividing 8 works (tiny models included).

Departure from bitsandbytes' QLoRA: the same NF4 code book and block size, but computed in PyTorch
(`linear_nf4`: dequantize to the input's dtype, then a plain matmul). bitsandbytes is not used: its FSDP2
path has open corruption reports on CUDA (bitsandbytes #1945, accelerate #3983).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from grpo_fsdp.config import HardwareConfig

BLOCK = 64  # values per absmax scale (QLoRA's and torchao's block)
SCALER_BLOCK = 256  # scales per int8 scale block (torchao's default)
SHARD_SPLITS = 8  # every NF4 weight splits evenly into this many row shards (any world size dividing it)
# QLoRA's NF4 code book (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], as torchao stores it
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
              0.5626, 0.7230, 1.0)


def _torchao():
    """torchao's NF4 pieces. Its import logs a warning per CUDA-only extension it cannot load on a CPU torch, and
    torch's pytree logs deprecations for its enums: noise for our users, silenced during the import only."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import NF4Tensor, to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return NF4Tensor, to_nf4, linear_nf4


def is_nf4(t: torch.Tensor) -> bool:
    local = getattr(t, "_local_tensor", t)
    return type(local).__name__ == "NF4Tensor"


def scaler_block(numel: int) -> int:
    """The scaler block for a tensor of `numel` values (see the module docstring); 0 when it cannot be
    quantized and sharded that way (numel not a multiple of 64 x 8)."""
    if numel % (BLOCK * SHARD_SPLITS):
        return 0
    blocks = numel // BLOCK
    size = SCALER_BLOCK
    while size > 1 and blocks % (size * SHARD_SPLITS):
        size //= 2
    return size


def nf4_problem(name: str, shape: torch.Size, world_size: int) -> str | None:
    """Why the weight `name` cannot be an NF4 weight sharded over `world_size` ranks, or None."""
    numel = shape.numel()
    if not scaler_block(numel):
        return f"{name} has {numel} values, not a multiple of {BLOCK * SHARD_SPLITS} (NF4 blocks of {BLOCK} x {SHARD_SPLITS} shards)"
    if SHARD_SPLITS % world_size or shape[0] % world_size:
        return f"{name} ({tuple(shape)}) does not split evenly into NF4 shards over {world_size} ranks"
    return None


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """One whole weight -> NF4Tensor (same shape and dtype, dequantizes to it).

    torchao's own `to_nf4` with one departure: the nearest code-book level of each scaled value is found by
    `bucketize` against the midpoints between levels, in fp32, instead of 16 distances per value in the
    weight's dtype: 0.15 s instead of 0.5 s for one 1536 x 1536 bf16 weight on one AMD EPYC core (measured;
    ~10 s instead of ~35 s for Qwen2.5-1.5B's q/k/v/o). The same bytes as torchao from fp32 weights (tested); from
    bf16 ones, torchao's bf16 distances round differently for ~0.7% of the values (ours are the nearer level).
    Scales and their double quantization are torchao's."""
    NF4Tensor, _, _ = _torchao()
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

    w = weight.contiguous()
    n_blocks, sb = w.numel() // BLOCK, scaler_block(w.numel())
    scalers, factors, mean = NF4Tensor.double_quantize_scalers(w.flatten(), BLOCK, sb)
    levels = torch.tensor(NF4_LEVELS, device=w.device, dtype=w.dtype)  # what dequantization multiplies
    blocks = w.reshape(n_blocks, BLOCK).float()
    scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True)).flatten()  # in [-1, 1]
    mids = torch.tensor(NF4_LEVELS, device=w.device, dtype=torch.float32)
    index = torch.bucketize(scaled, (mids[1:] + mids[:-1]) / 2).to(torch.uint8)  # nearest level; a tie goes down
    packed = index[::2] << 4 | index[1::2]  # two 4-bit codes per byte, as torchao packs them
    meta = SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, w.requires_grad)
    return NF4Tensor(meta, BLOCK, n_blocks, sb, scalers, factors, mean, packed, levels)


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, hw: HardwareConfig,
                      weights: Callable[[str, nn.Parameter], torch.Tensor] | None = None) -> int:
    """Replace the base `weight` of every LoRA layer of `model` by a frozen NF4 parameter, in place; returns
    how many. Call before `fully_shard`. `weights(name, param)` gives the full weight to quantize (the model
    builder passes rank 0's broadcast, so meta-built layers get real weights one at a time); default: the
    parameter's own values. Quantized from `hardware.param_dtype`, which is also what it dequantizes to."""
    from grpo_fsdp.lora import clean_name, lora_modules
    from grpo_fsdp.models import DTYPES

    dtype = DTYPES[hw.param_dtype]
    count = 0
    for name, m in lora_modules(model):
        full = m.weight if weights is None else weights(f"{clean_name(name)}.weight", m.weight)
        if full.is_meta:
            raise ValueError(f"quantize_base_nf4: {name}.weight has no values (meta); pass `weights`")
        m.weight = nn.Parameter(to_nf4(full.to(dtype)), requires_grad=False)
        count += 1
    return count


def full_weight(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one full, plain tensor: a DTensor shard is all-gathered (collective), an NF4 weight is
    dequantized (each rank dequantizes its own shard first: a shard is whole scale blocks)."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        if is_nf4(local):
            from torch.distributed.tensor import DTensor

            plain = local.get_original_weight()
            t = DTensor.from_local(plain, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
        return t.full_tensor()
    return t.get_original_weight() if is_nf4(t) else t.detach()


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the NF4 weights of `model` on this rank (packed values, scales and their factors)."""
    total = 0
    for p in model.parameters():
        local = getattr(p, "_local_tensor", p)
        if is_nf4(local):
            total += sum(getattr(local, a).numel() * getattr(local, a).element_size()
                         for a in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"))
    return total
