"""LoRA adapters (Hu et al. 2021) on the policy's linear layers, as our own small module.

`apply_lora(model, cfg)` replaces each targeted `nn.Linear` (by its last name: q_proj, k_proj, ...; or
every linear inside the decoder blocks with `all-linear`) by a `LoRALinear` that keeps the base layer's
`weight` and `bias` under the same names, frozen, and adds two trainable matrices:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r]

A is initialised like `nn.Linear` (Kaiming-uniform, a = sqrt(5)) and B to zero, so before the first update
the model is exactly the base model (B A = 0 adds exact zeros). The adapters live in submodules
`lora_A` / `lora_B` (bias-free `nn.Linear`), so their state-dict keys are PEFT's own
(`...q_proj.lora_A.weight`) and the PEFT export only prefixes `base_model.model.` (export.py).

Why not PEFT's injection: it wraps layers after the model is built and its tuner layers assume ordinary
tensors; here the layers are wrapped on the `meta` device before FSDP2 `fully_shard`, the base weight may
be a torchao `NF4Tensor` (quant.py), and nothing but this forward touches them (torchtune does the same).

Everything else of the model (embeddings, norms, the LM head, untargeted linears) is frozen too: only the
adapters reach the optimizer (`trainable_parameters`) and FSDP's gradient reduce-scatter, which skips
parameters without gradients. `adapters_disabled(model)` turns every adapter off for the duration of a
`with` block: the base model, used as the KL reference (algo.beta > 0) with no second copy of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from grpo_fsdp.config import LoraConfig
from grpo_fsdp.distributed import full_tensor

ALL_LINEAR = "all-linear"


def _is_nf4(weight: torch.Tensor) -> bool:
    local = getattr(weight, "_local_tensor", weight)  # a DTensor shard or the tensor itself
    return type(local).__name__ == "NF4Tensor"


class LoRALinear(nn.Module):
    """A frozen linear layer (plain or NF4 weight) plus a trainable low-rank update; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen, same name as in the base layer (checkpoint and export keys unchanged)
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_on = True
        self.dense_base = False  # `dense_nf4_bases`: an NF4 weight dequantized once, kept until the flag drops
        self._dense: torch.Tensor | None = None
        if device.type != "meta":
            self.reset_adapters()

    @torch.no_grad()
    def reset_adapters(self, generator: torch.Generator | None = None) -> None:
        """A as `nn.Linear` initialises a weight (uniform in +-1/sqrt(in), i.e. Kaiming a = sqrt(5)), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.weight.uniform_(-bound, bound, generator=generator)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_base:  # an NF4 weight (dense_nf4_bases sets it on no other): linear_nf4's numbers, dequantized once
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = self.weight.get_original_weight().to(x.dtype)
            out = F.linear(x, self._dense, self.bias)
        elif _is_nf4(self.weight):  # dequantizes to x's dtype; backward needs no gradient for the weight
            from grpo_fsdp.quant import _torchao

            out = _torchao()[2](x, self.weight)
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(x, self.weight, self.bias)
        if not self.adapters_on:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, scaling={self.scaling:g}"


def _decoder_layers(model: nn.Module) -> nn.Module:
    """The part of the model LoRA may target: the decoder blocks (never the LM head or embeddings)."""
    layers = getattr(model, "layers", None)
    return layers if layers is not None else model.model.layers


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Qualified names (relative to `model`) of the linears `targets` selects."""
    blocks = _decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    every = ALL_LINEAR in targets
    return [f"{prefix}.{n}" for n, m in blocks.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and ".lora_" not in f".{n}"
            and (every or n.rsplit(".", 1)[-1] in targets)]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Freeze every parameter of `model`, then wrap the targeted linears in `LoRALinear` in place (on any
    device, `meta` included: the adapters are then initialised when the weights are loaded,
    `initial_adapter_state`). Raises ValueError when `cfg.target_modules` selects nothing."""
    model.requires_grad_(False)
    names = target_names(model, list(cfg.target_modules))
    if not names:
        raise ValueError(f"hardware.lora.target_modules={list(cfg.target_modules)} selects no linear layer of the model")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), cfg.rank, cfg.alpha, cfg.dropout))


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def initial_adapter_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full (unsharded, CPU) initial adapters of a model wrapped on any device: rank 0 adds them to the full
    state dict it broadcasts, so every world size starts from the same adapters. Keys are the model's
    state-dict keys (wrapper segments such as `_checkpoint_wrapped_module.` never occur: call this
    before `parallelize`)."""
    gen = torch.Generator().manual_seed(seed + 0x10A)  # its own stream: the tiny model's init stays as it was
    state = {}
    for name, m in lora_modules(model):
        r = m.lora_A.out_features
        bound = 1.0 / math.sqrt(m.in_features)
        state[f"{name}.lora_A.weight"] = torch.empty(r, m.in_features).uniform_(-bound, bound, generator=gen)
        state[f"{name}.lora_B.weight"] = torch.zeros(m.out_features, r)
    return state


def peft_adapter_config(model: nn.Module, cfg: LoraConfig, base_model: str) -> dict:
    """`adapter_config.json` in PEFT's format for the adapters of `model` (PEFT and vLLM's LoRARequest read it).
    `target_modules` lists the last names actually wrapped (all-linear resolved)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": cfg.rank,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": leaves, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "use_rslora": False}


def adapter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters, full tensors on the CPU, under their state-dict keys (wrapper segments removed).
    Collective under FSDP2 (each DTensor shard is all-gathered): every rank calls it."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[clean_name(name)] = full_tensor(p).detach().to("cpu", torch.float32).clone()
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block `model` computes as its base model (every adapter off); restored on exit."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.adapters_on for m in mods]
    for m in mods:
        m.adapters_on = False
    try:
        yield model
    finally:
        for m, on in zip(mods, before, strict=True):
            m.adapters_on = on


def _plain_nf4_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for _, m in lora_modules(model) if type(m.weight).__name__ == "NF4Tensor"]  # not a DTensor shard


def dense_nf4_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of every NF4 base weight of `model` (whole, also when sharded) dequantized to `dtype`: what
    `dense_nf4_bases` holds."""
    numel = sum(m.weight.numel() for _, m in lora_modules(model) if _is_nf4(m.weight))
    return numel * torch.empty((), dtype=dtype).element_size()


@contextmanager
def dense_nf4_bases(model: nn.Module):
    """Inside the block each plain NF4 base weight is dequantized at its first use and kept (in the input's dtype),
    so a rollout's decode steps stop dequantizing every weight at every step; freed on exit. The numbers are
    linear_nf4's own (the same dequantization, then F.linear): tested equal bit for bit."""
    mods = _plain_nf4_layers(model)
    for m in mods:
        m.dense_base = True
    try:
        yield model
    finally:
        for m in mods:
            m.dense_base, m._dense = False, None


class BaseModel:
    """Calls `model` with its adapters off: the reference of a LoRA policy (GRPO's KL reference, recipes/grpo.py;
    DPO's reference, recipes/dpo.py), callable like the policy itself, with its `training` / `train` / `eval`
    (the dropout mode is the policy's own). Under FSDP2 a collective like any forward."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> BaseModel:
        self.model.train(mode)
        return self

    def eval(self) -> BaseModel:
        return self.train(False)


_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    for seg in _WRAPPERS:
        name = name.replace(seg, "")
    return name


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one full plain tensor: DTensor shards gathered, NF4 dequantized (quant.py)."""
    from grpo_fsdp.quant import full_weight

    return full_weight(t)


@torch.no_grad()
def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model, one full tensor at a time, under the Hugging Face names: each LoRA layer's
    `weight` becomes W + (alpha / r) B A (W dequantized when NF4), in fp32 before the cast to `dtype` (default:
    the weight's dtype); adapter tensors are left out, every other parameter passes through gathered.
    A generator, collective under FSDP2: every rank iterates it to the end, in the same order. Feeds the
    transformers engine's weight sync and the merged export (`export.merge`)."""
    lora_of = {f"{clean_name(n)}.weight": m for n, m in lora_modules(model)}
    for name, p in model.named_parameters():
        key = clean_name(name)
        if ".lora_A." in key or ".lora_B." in key:
            continue
        full = _full(p)
        m = lora_of.get(key)
        if m is not None and m.adapters_on:
            a, b = _full(m.lora_A.weight).float(), _full(m.lora_B.weight).float()
            full = (full.float() + (b @ a) * m.scaling).to(dtype or full.dtype)
        elif dtype is not None:
            full = full.to(dtype)
        yield key, full
