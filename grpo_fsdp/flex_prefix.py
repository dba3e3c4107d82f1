"""The shared-prefix layout through FlexAttention: one call per layer over the flat row, with a block mask.

Same flat row and same attention pattern as `shared_prefix.shared_prefix_attention` (SDPA), so the same
log-probs and gradients (tests/test_flex_prefix.py, 1e-5 in fp32). Query token q sees key token k when

    same segment and k <= q      a segment is one prompt run or one completion (causal inside it)
    or q is a completion token and k a real token of the prompt it answers

What changes against the SDPA path, per layer: one kernel call instead of 1 + the number of length blocks;
no copy of each completion's prompt keys/values (`kp[b.owner]`, [n, Hkv, P, D] per block) and no
repeat of K/V heads for grouped-query attention (Flex reads them in place, `enable_gqa`); no dense
[n, 1, C, P+C] mask: a `BlockMask` (which 128 x 128 tiles hold any visible pair, and which are full)
is built once per micro-batch and shared by every layer. On CUDA the builder is compiled (`_compile=True`),
which fuses the rule into the block reduction instead of materialising [T, T] booleans; on CPU it
evaluates the rule densely once per micro-batch, which is cheap at CPU sizes.

CPU, measured with torch 2.13: compiled FlexAttention runs a fused forward, but the front end refuses
any backward on CPU ("FlexAttention does not support backward on CPU"). Where a CPU input needs a
gradient this module skips that one check and runs Flex's own unfused reference (the eager higher-order
op, whose autograd materialises the [Hq, T, T] scores): exact, but slower and larger than SDPA. So on
CPU, Flex serves tests and the no-grad scoring passes; `auto` never picks it there (grpo_attention.py).

The row length T differs from one micro-batch to the next. On CPU the kernel is compiled for static
shapes, once per length: the dynamic-shape recompile that torch.compile makes by default at the second
length failed in torch 2.13's C++ template ("'cur_kvSplitSize8' was not declared", measured with this
mask; a plain causal mask compiled). On CUDA it keeps torch.compile's default (dynamic after the first
recompile). First GPU run (H200, torch 2.11): one shape compiled and trained; the second shape's
recompile did not finish within 45-100 s (benchmarks/results/gpu_check-2026-11-30-nvidia-h200.md), so
`auto` does not pick flex on CUDA; tests/test_gpu_flex.py and gpu_check.sh's flex lines check it again.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from grpo_fsdp.shared_prefix import SharedPrefix

_compiled: dict = {}  # device type -> torch.compile(flex_attention), built on first use


def segments(sp: SharedPrefix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per flat token, each [T]: segment id (prompt run r -> r, completion n -> R + n), the run it belongs to or
    answers, whether it is a completion token, whether it is a real (not padding) prompt token."""
    R, P = sp.runs, sp.prefix_len
    dev = sp.input_ids.device
    run = [torch.arange(R, device=dev).repeat_interleave(P)]
    seg = [run[0]]
    real = [(torch.arange(P, device=dev)[None, :] < sp.prompt_lengths.to(dev)[:, None]).flatten()]
    for b in sp.blocks:
        seg.append((R + b.rows).repeat_interleave(b.length))
        run.append(b.owner.repeat_interleave(b.length))
        real.append(torch.zeros(len(b.rows) * b.length, dtype=torch.bool, device=dev))
    seg_t = torch.cat(seg)
    return seg_t, torch.cat(run), seg_t >= R, torch.cat(real)


def prefix_block_mask(sp: SharedPrefix, block_size: int = 128) -> BlockMask:
    """The `BlockMask` of micro-batch `sp` (see the module docstring), on the device of `sp`."""
    seg, run, completion, real = segments(sp)

    def visible(b, h, q, k):
        return ((seg[q] == seg[k]) & (k <= q)) | (completion[q] & real[k] & (run[k] == run[q]))

    T = seg.shape[0]
    dev = seg.device
    return create_block_mask(visible, None, None, T, T, device=dev, BLOCK_SIZE=block_size, _compile=dev.type == "cuda")


@contextlib.contextmanager
def _cpu_reference_backward():
    """Let Flex's unfused reference run a CPU backward (torch 2.13's front end refuses it, see the docstring)."""
    check = flex_module._validate_device
    flex_module._validate_device = lambda *args: None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            yield
    finally:
        flex_module._validate_device = check


def flex_prefix_attention(module, query, key, value, block_mask: BlockMask, sp: SharedPrefix, dropout: float, scaling,
                          sliding_window, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (rotary applied) -> ([1, T, Hq, D], None)."""
    longest = max(b.length for b in sp.blocks)
    if sliding_window is not None and sliding_window < sp.prefix_len + longest:
        raise NotImplementedError(f"FlexAttention shared prefix does not implement sliding windows ({sliding_window} < "
                                  f"{sp.prefix_len + longest} tokens); set algo.shared_prefix=false")
    if kwargs.get("softcap") is not None or dropout:
        raise NotImplementedError("FlexAttention shared prefix implements neither logit soft-capping nor attention dropout; "
                                  "set hardware.grpo_attention=sdpa")
    gqa = query.shape[1] != key.shape[1]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if query.device.type == "cpu" and needs_grad:
        with _cpu_reference_backward():
            out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    else:
        kind = query.device.type
        if kind not in _compiled:  # static shapes on CPU, automatic dynamic elsewhere (see the module docstring)
            _compiled[kind] = torch.compile(flex_attention, dynamic=False if kind == "cpu" else None)
        out = _compiled[kind](query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None
