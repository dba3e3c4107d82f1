"""The attention implementation our models run: transformers' own, plus two cases it does not serve.

`attention_name(base)` registers `grpo_fsdp+<base>` with transformers (attention function and
mask function) and returns the name to put in a model config. A call goes to:

    shared_prefix.shared_prefix_attention   when the forward passes `shared_prefix=` (GRPO training:
                                            each prompt once, its completions attending to it)
    flex_prefix.flex_prefix_attention       ... and `flex_mask=` too (hardware.grpo_attention=flex)
    varlen.varlen_attention                 when it passes `varlen=` (fa2_varlen: padding-free rows)
    SDPA with enable_gqa                    base "sdpa", on CPU, grouped-query heads and a mask:
                                            transformers repeats the key/value heads first
                                            (`repeat_kv`, a copy per layer per step) because CUDA's
                                            fused kernels refuse GQA with a mask; the CPU kernels
                                            take it (measured at decode shapes, 64 rows x 150 keys:
                                            255 us vs 476 us per call)
    the base implementation                 everything else, unchanged

The mask function is the base's, so padded batches get exactly the masks they got before.

Under `hardware.compile` (each decoder block compiled, parallelize.py) the shared-prefix attention runs
eagerly, a graph break inside the block: its Python structure (number of prompts, number of length
blocks, their lengths) differs from one micro-batch to the next, and traced it made Dynamo recompile
the block for nearly every micro-batch until `torch._dynamo.config.recompile_limit` (8) was hit, after
which the blocks ran uncompiled for the rest of the run (measured: 4 micro-batches, issue 11 item 22).
Eager, it is a handful of SDPA calls; the projections, rotary, norms and MLP around it stay compiled.
The FlexAttention and FA2 varlen paths are graph breaks for the same reason (Flex compiles its own kernel).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo_fsdp.shared_prefix import SharedPrefix, shared_prefix_attention

PREFIX = "grpo_fsdp+"
_shared_prefix_eager = torch.compiler.disable(shared_prefix_attention)  # see the module docstring


@functools.cache
def _eager(kind: str):  # imported on first use: the SDPA path never loads FlexAttention
    if kind == "flex":
        from grpo_fsdp.flex_prefix import flex_prefix_attention as fn
    else:
        from grpo_fsdp.varlen import varlen_attention as fn
    return torch.compiler.disable(fn)


def _flex_eager(*args, **kwargs):
    return _eager("flex")(*args, **kwargs)


def _varlen_eager(*args, **kwargs):
    return _eager("varlen")(*args, **kwargs)


def _cpu_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None):
    """transformers' SDPA path (same causal rule) without repeating the key/value heads -> ([B, L, Hq, D], None)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def attention_name(base: str | None) -> str | None:
    """Register `grpo_fsdp+<base>` with transformers (once) and return it; None when `base` cannot be wrapped
    (eager attention lives in each model file, not in transformers' registry; None leaves the choice to
    transformers)."""
    if not base:
        return None
    name = base if base.startswith(PREFIX) else PREFIX + base  # idempotent: a config already ours stays as it is
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base not in ALL_ATTENTION_FUNCTIONS or base not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None
    base_fn = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  shared_prefix: SharedPrefix | None = None, flex_mask=None, varlen=None, **kwargs):
        if varlen is not None:
            return _varlen_eager(module, query, key, value, varlen, dropout, scaling, sliding_window, **kwargs)
        if shared_prefix is not None and flex_mask is not None:
            return _flex_eager(module, query, key, value, flex_mask, shared_prefix, dropout, scaling, sliding_window, **kwargs)
        if shared_prefix is not None:
            return _shared_prefix_eager(module, query, key, value, shared_prefix, dropout, scaling, sliding_window, **kwargs)
        plain = all(kwargs.get(k) is None for k in ("position_bias", "cache")) and not kwargs.get("output_attentions")
        if (base == "sdpa" and plain and query.device.type == "cpu" and query.shape[1] != key.shape[1]
                and attention_mask is not None and sliding_window is None):
            return _cpu_gqa_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs.get("is_causal"))
        return base_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       sliding_window=sliding_window, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def with_our_attention(conf: PretrainedConfig) -> PretrainedConfig:
    """A copy of `conf` whose attention is `grpo_fsdp+<base>`; eager attention stays as it is. A copy, so that
    the config that is exported or handed to vLLM keeps the plain base implementation."""
    conf = copy.deepcopy(conf)
    name = attention_name(conf._attn_implementation)
    if name is not None:
        conf._attn_implementation = name
    return conf
