"""Load a model and its tokenizer from a hub id or a local directory, or build the tiny model.

Loading never materialises a large model on every rank: all ranks build the network on the
`meta` device, shard it (`parallelize`), allocate only their shards, and rank 0 alone reads the
full weights and broadcasts them shard by shard (`set_model_state_dict(broadcast_from_rank0)`).
One process without mixed precision or offload is not sharded (parallelize.shards): the same steps
then allocate and fill plain parameters.

`model=tiny` is a small Qwen2-architecture network initialised from a seed, with the project's
own byte-level tokenizer, so the embedded default needs no download.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, Qwen2Config

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import HardwareConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_backend(requested: str, device_type: str) -> str:
    """FlashAttention-2 where it is installed and usable, SDPA otherwise (with one warning line)."""
    if requested != "flash_attention_2":
        return requested
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return requested
    why = "flash-attn is not installed" if device_type == "cuda" else "FlashAttention-2 needs a CUDA device"
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {why}; using attn_implementation=sdpa", file=sys.stderr)
    return "sdpa"


def load_tokenizer(cfg: ModelConfig):
    """`model.tokenizer`, else the model's own, else (the tiny model) the byte-level tokenizer."""
    source, field_ = (cfg.tokenizer, "model.tokenizer") if cfg.tokenizer else (cfg.path, "model.path")
    if not source:
        from grpo_fsdp.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{field_}={source!r}: cannot load a tokenizer ({str(e).splitlines()[0]}); "
                        "use a local model directory or a reachable hub id") from None
    if tok.pad_token is None:  # many base models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def hf_config(cfg: ModelConfig, tokenizer, attn: str) -> PretrainedConfig:
    """The transformers config: built from `arch` for the tiny model, read from disk/hub otherwise."""
    if not cfg.path:
        a = cfg.arch
        conf = Qwen2Config(
            vocab_size=a.vocab_size or len(tokenizer),
            hidden_size=a.hidden_size,
            intermediate_size=a.intermediate_size,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads,
            max_position_embeddings=a.max_position_embeddings,
            rope_theta=a.rope_theta,
            tie_word_embeddings=a.tie_embeddings,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        try:
            conf = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path={cfg.path!r}: cannot load config.json ({str(e).splitlines()[0]}); "
                            "use a local model directory or a reachable hub id") from None
    conf._attn_implementation = attn
    return conf


def build_on_meta(conf: PretrainedConfig, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network's structure with no storage: every rank can afford this for any model size."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf, dtype=dtype, trust_remote_code=trust_remote_code)


def full_state_dict(cfg: ModelConfig, conf: PretrainedConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full weights on CPU, for rank 0 only: seeded init for the tiny model, else from disk/hub."""
    if not cfg.path:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    else:
        try:  # keep the checkpoint's dtype: the copy into fp32 shards happens shard by shard
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype="auto", trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path={cfg.path!r}: cannot load weights ({str(e).splitlines()[0]})") from None
    return model.state_dict()


def init_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers outside the state dict (rotary `inv_freq`) are garbage after `to_empty`: recompute them."""
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with torch.device("cpu"):  # rebuilt where real storage exists, then copied over
                fresh = type(module)(config=module.config)
            for buf_name, buf in fresh.named_buffers(recurse=False):
                getattr(module, buf_name).copy_(buf.to(device))


def compute_dtype(hw: HardwareConfig) -> torch.dtype:
    return DTYPES[hw.param_dtype]


def build_policy(cfg: ModelConfig, hw: HardwareConfig, tokenizer, dist_info, seed: int, chunk_size: int):
    """Meta build -> parallelize -> allocate shards -> rank 0 broadcasts the weights. Returns (policy, hf config)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from grpo_fsdp.attention import with_our_attention
    from grpo_fsdp.parallelize import parallelize
    from grpo_fsdp.policy import Policy

    attn = attention_backend(hw.attn_implementation, dist_info.device.type)
    conf = hf_config(cfg, tokenizer, attn)
    full = full_state_dict(cfg, conf, seed) if dist_info.is_main else {}
    # LoRA: the frozen base is stored in the compute dtype (no fp32 master copy: it is never updated)
    base_dtype = DTYPES[hw.param_dtype] if hw.lora.enabled else torch.float32
    policy = Policy(build_on_meta(with_our_attention(conf), cfg.trust_remote_code, base_dtype), chunk_size, hw.grpo_attention)
    # with CPU offload the sharded parameters live on the CPU; buffers always on the compute device
    home = torch.device("cpu") if hw.cpu_offload else dist_info.device
    if hw.lora.enabled:
        _add_lora(policy, hw, full, dist_info, seed, home, cfg.path)
    parallelize(policy, hw, dist_info.mesh)
    materialize(policy, home)
    init_nonpersistent_buffers(policy, dist_info.device)
    # NF4 weights were loaded (and left out of `full`) by _add_lora
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=not hw.load_in_4bit))
    del full
    return policy, conf


def _add_lora(policy, hw: HardwareConfig, full: dict, dist_info, seed: int, home: torch.device, model_path: str) -> None:
    """LoRA on the meta-built policy (before `parallelize`): wrap the targets, let rank 0 add the initial adapters
    to the weights it broadcasts, and with `load_in_4bit` quantize each target's base weight, whole, on every
    rank (rank 0 broadcasts it, one at a time: quant.py explains why not shard by shard). On one rank the NF4
    weights stay out of FSDP, on the compute device (parallelize.nf4_left_out)."""
    import torch.distributed as dist

    from grpo_fsdp.lora import apply_lora, initial_adapter_state, lora_modules, peft_adapter_config
    from grpo_fsdp.quant import nf4_problem, quantize_base_nf4

    apply_lora(policy, hw.lora)
    # what checkpoints and exports record about the adapters (checkpoint.py, export.py)
    policy.lora_info = {"adapter_config": peft_adapter_config(policy, hw.lora, model_path),
                        "load_in_4bit": hw.load_in_4bit, "param_dtype": hw.param_dtype}
    if dist_info.is_main:
        full.update(initial_adapter_state(policy, seed))
    if not hw.load_in_4bit:
        return
    for name, m in lora_modules(policy):  # shapes are known only now (config.json): one line, before any transfer
        if problem := nf4_problem(f"{name}.weight", m.weight.shape, dist_info.world_size):
            raise UserError(f"hardware.load_in_4bit: {problem}; use another world size or hardware.load_in_4bit=false")
    nf4_home = home if dist_info.world_size > 1 else dist_info.device

    def received(name: str, meta: torch.Tensor) -> torch.Tensor:
        if dist_info.world_size == 1:
            return full.pop(name).to(nf4_home, meta.dtype)
        t = full.pop(name).to(dist_info.device, meta.dtype) if dist_info.is_main else \
            torch.empty(meta.shape, dtype=meta.dtype, device=dist_info.device)
        dist.broadcast(t, src=0)  # on the compute device: what the process group's backend serves
        return t.to(nf4_home)

    quantize_base_nf4(policy, hw, received)


def materialize(model: nn.Module, device: torch.device) -> None:
    """`to_empty` for the parameters and buffers still on `meta` (NF4 weights already hold their values).

    A parameter two modules share (tied embeddings: `lm_head.weight is embed_tokens.weight`) stays one
    parameter. FSDP2's DTensor parameters are swapped in place, which keeps the tie; a plain meta parameter is
    replaced per module (the unsharded one-process path, parallelize.py), which would split it into two
    independently trained copies, so the later owners get the first one's again."""
    ties, first = [], {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owner = first.setdefault(id(p), (module, name))
                if owner != (module, name):
                    ties.append((module, name, owner))
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for module, name, (owner, owner_name) in ties:
        if getattr(module, name) is not getattr(owner, owner_name):
            setattr(module, name, getattr(owner, owner_name))


def build_reference(policy, conf: PretrainedConfig, cfg: ModelConfig, hw: HardwareConfig, dist_info, chunk_size: int):
    """The frozen reference policy of the KL penalty (algo.beta > 0): a copy of `policy`'s weights as built.

    Call it before any update or checkpoint load, so that it holds the starting weights. Stored in
    `hardware.param_dtype`, the dtype its forward computes in anyway: it is never updated, so it needs no
    fp32 master copy, no gradients and no optimizer state (bf16: half the memory of a second policy).
    Sharded like the policy (same mesh, offload and wrapping, so its shards copy over locally, no disk
    read or broadcast), but every FSDP unit, the root included, reshards after its forward: the reference
    never runs a backward, which is where the policy's root and last block are resharded, so it would
    otherwise keep them gathered through the whole update.
    """
    from grpo_fsdp.attention import with_our_attention
    from grpo_fsdp.parallelize import is_sharded, parallelize
    from grpo_fsdp.policy import Policy

    reference = Policy(build_on_meta(with_our_attention(conf), cfg.trust_remote_code, DTYPES[hw.param_dtype]), chunk_size,
                       hw.grpo_attention)
    reference.requires_grad_(False)
    parallelize(reference, hw, dist_info.mesh)
    if is_sharded(reference):  # the unsharded one-process path (parallelize.shards) holds its weights anyway
        reference.set_reshard_after_forward(True)
    materialize(reference, torch.device("cpu") if hw.cpu_offload else dist_info.device)
    init_nonpersistent_buffers(reference, dist_info.device)
    with torch.no_grad():  # shard to shard, cast to param_dtype by copy_
        reference.load_state_dict(policy.state_dict(), strict=True)
    return reference.eval()
