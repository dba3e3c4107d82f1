"""Per-device memory estimate for the dry run, from config numbers alone (nothing is loaded).

Inputs: `cfg.model.arch` (shapes), `cfg.hardware` (sharding, dtypes, offload, LoRA, checkpointing),
`cfg.train` (micro-batch, log-prob chunk), `cfg.data.max_length` and the world size N.
The model is taken to be a Qwen2-style decoder (Qwen2/Qwen2.5, DeepSeek-R1-Distill-Qwen): QKV
projections with biases, o_proj without, SwiGLU MLP, RMSNorm. Phi-3 and Llama have no attention
biases; `attention_bias` drops them, chosen from the model name (a few hundred thousand
parameters either way). Phi-3's fused qkv/gate_up projections have the same parameter count.

Model of FSDP2 memory (Zhao et al. 2023, "PyTorch FSDP"; Rajbhandari et al. 2020, "ZeRO"), P params:
- weights: the sharded fp32 master copy, 4P/N, plus the gathered compute-dtype copy. With
  `reshard_after_forward=True` (FULL_SHARD) about two blocks are gathered at once (the current one
  and the prefetched next) plus the root module's parameters (embeddings, final norm, LM head),
  which FSDP2 keeps gathered between forward and backward; with False (ZeRO-2-like) the whole
  model stays gathered: c*P for a c-byte compute dtype.
- gradients: sharded fp32, 4P/N. Optimizer: AdamW exp_avg + exp_avg_sq in fp32, 8P/N.
- activations: see `_activation_bytes` (Korthikanti et al. 2022) plus the LM-head chunk logits.
- CPU offload (FSDP2 CPUOffloadPolicy): the sharded params, grads and optimizer live in host memory
  (`cpu_bytes`); only the gathered copies stay on the device.
- LoRA (Hu et al. 2021): base weights are frozen, so they need no fp32 master, gradient or optimizer
  state; we assume they are stored in the compute dtype, or at 0.5 byte/param for the block linear
  weights with 4-bit NF4 (Dettmers et al. 2023, "QLoRA"; quantisation constants ignored).
  Adapters add r*(in+out) params per targeted module and carry fp32 weights, grads and Adam.
- GRPO reference model (algo.beta > 0, `models.build_reference`): the policy's weights in the compute
  dtype, frozen (no fp32 master, gradient or optimizer state), sharded like the policy: c*P/N, on the
  host with CPU offload. Its gathered blocks exist only during its own forward (log-probs phase).
- GRPO rollout engine, which holds its own unsharded copy of the weights (it does not share the
  trainer's modules): the transformers engine (`rollout/hf.py`) builds the whole model in the compute
  dtype, c*P; vLLM reserves `hardware.vllm_memory_share` of the device (weights + KV cache). While the
  trainer works the engine sleeps (level 1 parks the weights in host memory, 2 drops them; on a CPU
  device level 1 keeps them in place), so a GRPO step has two peaks: training (weights, gradients,
  optimizer, activations, reference) and generation (the trainer's shards and optimizer state, the
  reference, the engine). `total` is the larger.

Not counted: CUDA context and NCCL buffers (~0.5-1 GiB), allocator fragmentation, transient
unsharded gradients of one block before reduce-scatter, the transformers engine's KV cache, and the
reference's gathered blocks during its forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_fsdp.config import ArchConfig, Config, GRPOConfig

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# model=tiny takes its vocabulary from the project's byte-level tokenizer (vocab_size: 0): 256
# bytes plus 3 special tokens (grpo_fsdp/tokenizer.py; a test keeps the two in step).
TINY_VOCAB_FALLBACK = 259
# Korthikanti et al. 2022, eq. (1): bytes of activations per token per hidden unit per layer,
# 34*s*b*h + 5*a*s^2*b with 16-bit activations; flash/SDPA attention never stores the a*s^2 scores.
KORTHIKANTI_BYTES_PER_TOKEN_HIDDEN = 34
NF4_BYTES = 0.5


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


def _vocab(arch: ArchConfig, vocab_size: int | None) -> int:
    if vocab_size:
        return vocab_size
    return arch.vocab_size or TINY_VOCAB_FALLBACK


def _kv_dim(arch: ArchConfig) -> int:
    return arch.hidden_size // arch.num_heads * arch.num_kv_heads


def param_breakdown(arch: ArchConfig, *, attention_bias: bool = True, vocab_size: int | None = None) -> ParamBreakdown:
    h, i, kv = arch.hidden_size, arch.intermediate_size, _kv_dim(arch)
    v = _vocab(arch, vocab_size)
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
    h, i, kv = arch.hidden_size, arch.intermediate_size, _kv_dim(arch)
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


def _attention_bias(model_name: str) -> bool:
    # Qwen2-family checkpoints have q/k/v biases; Phi-3 and Llama-family do not.
    return not model_name.lower().startswith(("phi", "llama"))


def _activation_bytes(cfg: Config, vocab: int) -> int:
    """Activations of one micro-batch (micro_batch_size x data.max_length tokens, padded)."""
    arch, hw, c = cfg.model.arch, cfg.hardware, DTYPE_BYTES[cfg.hardware.param_dtype]
    tokens = cfg.train.micro_batch_size * cfg.data.max_length  # s*b
    # Korthikanti et al. 2022: one layer stores ~34*s*b*h bytes with 16-bit activations (SwiGLU's
    # wider MLP makes this a slight underestimate); scaled by c/2 for fp32 compute.
    one_layer = KORTHIKANTI_BYTES_PER_TOKEN_HIDDEN * tokens * arch.hidden_size * c // 2
    if hw.activation_checkpointing:
        # Saved block inputs (s*b*h*c per layer) plus one block recomputed in full during backward.
        blocks = arch.num_layers * tokens * arch.hidden_size * c + one_layer
    else:
        blocks = arch.num_layers * one_layer
    # Chunked LM head (logprobs.py): in its backward, a chunk's fp32 logits, their softmax and the logits'
    # gradient, about 4 copies of [chunk, V] (measured 3.9 at V = 151,665, benchmarks/logprobs_memory.py);
    # never the full [tokens, V] tensor.
    chunk = min(cfg.train.logprob_chunk_size, tokens)
    return blocks + chunk * vocab * 4 * 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (and per rank in host memory for `cpu_bytes`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int  # on the device, the peak of the two phases: max(training, generation)
    cpu_bytes: int  # host memory per rank, used by CPU offload
    params: int
    trainable_params: int
    world_size: int
    notes: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()  # overrides that would lower the total, shown when it does not fit
    reference: int = 0  # GRPO with algo.beta > 0: the frozen reference model's shard on the device
    engine: int = 0  # GRPO: the rollout engine on the device while it generates
    training: int = 0  # weights + gradients + optimizer + activations + reference (+ an engine that stays awake)
    generation: int = 0  # GRPO: the trainer's shards and optimizer state + reference + engine; 0 without rollouts


def estimate_memory(cfg: Config, world_size: int, vocab_size: int | None = None) -> MemoryEstimate:
    """Estimate per-device memory; `vocab_size` overrides arch.vocab_size (e.g. a tokenizer's)."""
    hw, arch, n = cfg.hardware, cfg.model.arch, world_size
    c = DTYPE_BYTES[hw.param_dtype]
    vocab = _vocab(arch, vocab_size)
    pb = param_breakdown(arch, attention_bias=_attention_bias(cfg.model.name), vocab_size=vocab)
    p = pb.total
    notes: list[str] = []
    if not (vocab_size or arch.vocab_size):
        notes.append(f"vocab size taken as {vocab} (tokenizer not loaded)")

    gathered_layers = min(2, pb.num_layers) if hw.reshard_after_forward else pb.num_layers
    if hw.lora.enabled:
        lora, skipped = lora_param_count(arch, hw.lora.rank, hw.lora.target_modules)
        if skipped:
            notes.append(f"LoRA targets not counted: {', '.join(skipped)}")
        lora_layer = lora // pb.num_layers  # exact: lora_param_count sums identical layers
        base_linear_bytes = NF4_BYTES if hw.load_in_4bit else c
        base_layer_bytes = pb.layer_linear * base_linear_bytes + pb.layer_other * c
        layer_bytes = base_layer_bytes + lora_layer * c  # gathered adapters run in compute dtype
        root_bytes = pb.root * c
        # Frozen base sharded in its storage format; adapters keep an fp32 master copy.
        sharded = (pb.num_layers * base_layer_bytes + root_bytes) / n + 4 * lora / n
        trainable = lora
    else:
        layer_bytes, root_bytes = pb.per_layer * c, pb.root * c
        sharded = 4 * p / n  # fp32 master parameters
        trainable = p
    gathered = gathered_layers * layer_bytes + root_bytes
    gradients = 4 * trainable / n  # fp32 reduce-scattered gradients (reduce_dtype float32)
    optimizer = 8 * trainable / n  # AdamW exp_avg + exp_avg_sq, fp32
    activations = _activation_bytes(cfg, vocab)

    cpu = 0
    if hw.cpu_offload:
        cpu = sharded + gradients + optimizer
        weights, gradients, optimizer = gathered, 0, 0
    else:
        weights = sharded + gathered

    reference, engine, engine_awake, resident = 0, 0, 0, (0 if hw.cpu_offload else sharded + optimizer)
    if isinstance(cfg.algo, GRPOConfig):
        if cfg.algo.beta > 0:  # models.build_reference: compute dtype, frozen, sharded like the policy
            reference = c * p / n
            notes.append(f"reference model (algo.beta={cfg.algo.beta:g}): {hw.param_dtype}, frozen, sharded"
                         + (", on the host (CPU offload)" if hw.cpu_offload else ""))
            if hw.cpu_offload:
                cpu, reference = cpu + reference, 0
        engine, note = _engine_bytes(cfg, c * p)
        notes.append(note)
        if hw.device != "cuda" and (cfg.rollout.sleep_level == 1 or cfg.rollout.engine == "vllm"):
            engine_awake = engine  # a CPU engine stays while training: sleep(1) keeps weights in place, vLLM ignores sleep
    training = weights + gradients + optimizer + activations + reference + engine_awake
    generation = resident + reference + engine if engine else 0

    hints = []
    if not hw.activation_checkpointing:
        hints.append("hardware.activation_checkpointing=true")
    if cfg.train.micro_batch_size > 1:
        hints.append(f"train.micro_batch_size={cfg.train.micro_batch_size // 2}")
    if not hw.reshard_after_forward:
        hints.append("hardware.reshard_after_forward=true")
    if not hw.cpu_offload:
        hints.append("hardware.cpu_offload=true")
    if not hw.lora.enabled:
        hints.append("hardware.lora.enabled=true")

    parts = [round(x) for x in (weights, gradients, optimizer, activations)]
    training, generation = sum(parts) + round(reference) + round(engine_awake), round(generation)
    return MemoryEstimate(
        *parts, total=max(training, generation), cpu_bytes=round(cpu), params=p, trainable_params=trainable,
        world_size=n, notes=tuple(notes), hints=tuple(hints), reference=round(reference), engine=round(engine),
        training=training, generation=generation,
    )  # fmt: skip


def _engine_bytes(cfg: Config, weights: float) -> tuple[float, str]:
    """Device bytes of the GRPO rollout engine while it generates, and a note that says what was counted.

    `weights` is one unsharded copy in the compute dtype. rollout.engine=auto resolves only at start-up
    (vLLM where it imports, as in docker/, else transformers), so it counts the larger of the two.
    """
    hw, kind = cfg.hardware, cfg.rollout.engine
    if hw.device == "cuda" and hw.gpu_memory_gib > 0:
        vllm = hw.vllm_memory_share * hw.gpu_memory_gib * GIB
        vllm_note = f"vLLM reserves hardware.vllm_memory_share={hw.vllm_memory_share:g} of the device ({_gib(vllm)}, weights + KV cache)"
    else:  # vLLM on the CPU: its copy of the weights and the fixed hardware.vllm_kv_cache_gib
        vllm = weights + hw.vllm_kv_cache_gib * GIB
        vllm_note = f"vLLM holds its {hw.param_dtype} weights and a {hw.vllm_kv_cache_gib:g} GiB KV cache ({_gib(vllm)})"
    hf_note = (f"the transformers engine holds its own unsharded {hw.param_dtype} copy of the weights ({_gib(weights)}; "
               "its KV cache is not counted)")
    asleep = "asleep while training (rollout.sleep_level=1 parks the weights in host memory, 2 drops them)"
    if kind == "hf":
        return weights, f"rollout engine: {hf_note}, {asleep}"
    if kind == "vllm":
        return vllm, f"rollout engine: {vllm_note}, {asleep}"
    return max(weights, vllm), f"rollout engine (auto, the larger is counted): {vllm_note}; {hf_note}; {asleep}"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _count(x: int) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e8 else f"{x / 1e6:.2f} M"


def format_table(est: MemoryEstimate, gpu_memory_gib: float) -> str:
    """GiB per component and in total, and whether it fits a device of `gpu_memory_gib` (if > 0)."""
    rows = [
        ("parameters", f"{_count(est.params)} (trainable {_count(est.trainable_params)})"),
        ("world size", str(est.world_size)),
        ("weights", _gib(est.weights)),
        ("gradients", _gib(est.gradients)),
        ("optimizer", _gib(est.optimizer)),
        ("activations", _gib(est.activations)),
    ]
    if est.reference:
        rows.append(("reference model", _gib(est.reference)))
    if est.generation:  # GRPO: the engine generates while the trainer's gradients and activations are gone
        rows += [("rollout engine", f"{_gib(est.engine)} (while generating)"), ("training phase", _gib(est.training)),
                 ("generation phase", _gib(est.generation))]
    rows.append(("total per device", _gib(est.total)))
    if est.cpu_bytes:
        rows.append(("offloaded to CPU per rank", _gib(est.cpu_bytes)))
    width = max(len(k) for k, _ in rows)
    lines = ["memory estimate (per device)", "-" * (width + 2 + max(len(v) for _, v in rows))]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    if gpu_memory_gib > 0:
        cap = gpu_memory_gib * GIB
        share = f"{est.total / cap:.0%} of {gpu_memory_gib:g} GiB"
        if est.total <= cap:
            lines.append(f"fits: yes ({share}; CUDA context and fragmentation not counted)")
        else:
            tip = f"; try {', '.join(est.hints)}" if est.hints else ""
            lines.append(f"fits: NO ({share}){tip}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
