"""Parameter counts of a Qwen2-style decoder from its `ArchConfig` alone (no torch, no weights): the memory plan's
(estimate.py) and the preflight's (preflight.py) arithmetic, and LoRA's adapter sizes."""

from __future__ import annotations

from dataclasses import dataclass

from grpo_fsdp.config import ArchConfig

# model=tiny takes its vocabulary from the project's byte-level tokenizer (vocab_size: 0): 256
# bytes plus 3 special tokens (grpo_fsdp/tokenizer.py; a test keeps the two in step).
TINY_VOCAB_FALLBACK = 259


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts by where FSDP2 puts them: decoder blocks vs. the root module."""

    embedding: int
    layer_linear: int  # weight matrices of one block (q, k, v, o, gate, up, down): 4-bit-able
    layer_other: int  # biases and the two RMSNorm weights of one block
    num_layers: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def per_layer(self) -> int:
        return self.layer_linear + self.layer_other

    @property
    def root(self) -> int:
        return self.embedding + self.final_norm + self.lm_head

    @property
    def total(self) -> int:
        return self.root + self.num_layers * self.per_layer


def vocab_size_of(arch: ArchConfig, vocab_size: int | None) -> int:
    if vocab_size:
        return vocab_size
    return arch.vocab_size or TINY_VOCAB_FALLBACK


def kv_dim(arch: ArchConfig) -> int:
    return arch.hidden_size // arch.num_heads * arch.num_kv_heads


def param_breakdown(arch: ArchConfig, *, attention_bias: bool = True, vocab_size: int | None = None) -> ParamBreakdown:
    h, i, kv = arch.hidden_size, arch.intermediate_size, kv_dim(arch)
    v = vocab_size_of(arch, vocab_size)
    linear = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k+v, o_proj, gate/up/down
    biases = (h + 2 * kv) if attention_bias else 0  # q, k, v biases (Qwen2); o_proj has none
    return ParamBreakdown(
        embedding=v * h,
        layer_linear=linear,
        layer_other=biases + 2 * h,  # input and post-attention RMSNorm weights
        num_layers=arch.num_layers,
        final_norm=h,
        lm_head=0 if arch.tie_embeddings else v * h,
    )


def param_count(arch: ArchConfig, *, attention_bias: bool = True, vocab_size: int | None = None) -> int:
    """Total parameters of a Qwen2-style decoder with these shapes."""
    return param_breakdown(arch, attention_bias=attention_bias, vocab_size=vocab_size).total


def lora_module_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear in one block."""
    h, i, kv = arch.hidden_size, arch.intermediate_size, kv_dim(arch)
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip


def lora_param_count(arch: ArchConfig, rank: int, target_modules: list[str]) -> tuple[int, list[str]]:
    """Adapter params over all layers (A: r x in, B: out x r) and the target names not counted."""
    shapes = lora_module_shapes(arch)
    names = list(shapes) if "all-linear" in target_modules else list(target_modules)
    per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) for n in names if n in shapes)
    return per_layer * arch.num_layers, [n for n in names if n not in shapes]


def targeted_linear_params(arch: ArchConfig, target_modules: list[str]) -> int:
    """Weight params of one block's LoRA-targeted linears (what NF4 quantizes)."""
    shapes = lora_module_shapes(arch)
    return sum(i * o for name, (i, o) in shapes.items() if "all-linear" in target_modules or name in target_modules)


def has_attention_bias(model_name: str) -> bool:
    # Qwen2-family checkpoints have q/k/v biases; Phi-3 and Llama-family do not.
    return not model_name.lower().startswith(("phi", "llama"))
