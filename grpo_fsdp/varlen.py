"""A shared-prefix micro-batch re-laid out padding-free for FlashAttention-2's variable-length kernel.

`hardware.grpo_attention=fa2_varlen` (CUDA with flash-attn only; validation refuses it elsewhere). From
`shared_prefix.SharedPrefix` (each prompt once, completions in padded length blocks) this builds one
row with no padding at all, every completion behind its own copy of its prompt:

    [ prompt(owner 0) completion 0 | prompt(owner 1) completion 1 | ... ]    cu_seqlens marks the cuts

Position ids restart at 0 in each sequence (they are the shared layout's own, gathered), so every token
sees exactly what it sees in its padded row; `flash_attn_varlen_func(causal=True)` keeps sequences apart.
Against the shared layout this repeats each prompt once per completion (more projection and MLP work
when prompts are long) but drops all padding and runs FA2's kernels; `grpo_attention.choose` weighs the
two. flash-attn is imported on the first call only, so this module loads without it (tests swap
`_fa2` for a reference to check the layout on CPU; tests/test_gpu_attention.py runs the real kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from grpo_fsdp.shared_prefix import SharedPrefix


@dataclass
class Varlen:
    input_ids: torch.Tensor  # [1, Tv] long: prompt + completion of each sequence, concatenated, no padding
    position_ids: torch.Tensor  # [1, Tv] long: restarting at 0 in each sequence
    cu_seqlens: torch.Tensor  # [N+1] int32: sequence starts, then Tv
    max_len: int  # longest sequence
    predict_at: torch.Tensor  # [N, Cmax] long: flat position whose hidden state predicts completion token t


def varlen_layout(sp: SharedPrefix) -> Varlen:
    """The padding-free layout of `sp`'s completions (same order, same targets), on `sp`'s device."""
    R, P, N = sp.runs, sp.prefix_len, len(sp.lengths)
    owner, start = [0] * N, [0] * N  # each completion's prompt run and flat start in the shared row
    at = R * P
    for b in sp.blocks:
        for i, (row, own) in enumerate(zip(b.rows.tolist(), b.owner.tolist())):
            owner[row], start[row] = own, at + i * b.length
        at += len(b.rows) * b.length
    plen, clen = sp.prompt_lengths.tolist(), sp.lengths.tolist()
    src, cu, predict = [], [0], torch.zeros(sp.targets.shape, dtype=torch.long)
    for n in range(N):
        p, c = plen[owner[n]], clen[n]
        src += [torch.arange(owner[n] * P, owner[n] * P + p), torch.arange(start[n], start[n] + c)]
        predict[n] = cu[-1] + p - 1 + torch.arange(sp.targets.shape[1]).clamp(max=max(c - 1, 0))  # past the end: unused
        cu.append(cu[-1] + p + c)
    dev = sp.input_ids.device
    src_t = torch.cat(src).to(dev)
    return Varlen(input_ids=sp.input_ids[:, src_t], position_ids=sp.position_ids[:, src_t],
                  cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev), max_len=max(b - a for a, b in pairwise(cu)),
                  predict_at=predict.to(dev))


def _fa2(q, k, v, cu_seqlens, max_len: int, dropout: float, scale):
    """[Tv, Hq, D], [Tv, Hkv, D] x2 -> [Tv, Hq, D]: FlashAttention-2, causal within each sequence."""
    from flash_attn import flash_attn_varlen_func  # CUDA only; validation refuses fa2_varlen without it

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout,
                                  softmax_scale=scale, causal=True)


def varlen_attention(module, query, key, value, layout: Varlen, dropout: float, scaling, sliding_window, **kwargs):
    """query [1, Hq, Tv, D], key/value [1, Hkv, Tv, D] (rotary applied) -> ([1, Tv, Hq, D], None)."""
    if sliding_window is not None and sliding_window < layout.max_len:
        raise NotImplementedError(f"fa2_varlen does not implement sliding windows ({sliding_window} < {layout.max_len} "
                                  "tokens); set hardware.grpo_attention=sdpa")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("fa2_varlen does not implement logit soft-capping; set hardware.grpo_attention=sdpa")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [Tv, H, D]
    return _fa2(q, k, v, layout.cu_seqlens, layout.max_len, dropout, scaling)[None], None
