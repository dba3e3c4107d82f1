"""Per-device memory plan for the dry run and for start-up, from config numbers alone (nothing is loaded).

Inputs: `cfg.model.arch` (shapes), `cfg.hardware` (sharding, dtypes, offload, LoRA/4-bit, checkpointing),
`cfg.train` (micro-batch, log-prob chunk), the lengths (`data.*`, GRPO's `algo.max_new_tokens`, group size)
and the world size N. The model is taken to be a Qwen2-style decoder (Qwen2/Qwen2.5,
DeepSeek-R1-Distill-Qwen): QKV projections with biases, o_proj without, SwiGLU MLP, RMSNorm. Phi-3 and
Llama have no attention biases; `attention_bias` drops them, chosen from the model name.

Model of FSDP2 memory (Zhao et al. 2023, "PyTorch FSDP"; Rajbhandari et al. 2020, "ZeRO"), P params:
- weights: the sharded fp32 master copy, 4P/N, plus the gathered compute-dtype copy. With
  `reshard_after_forward=True` (FULL_SHARD) about two blocks are gathered at once (the current one and
  the prefetched next) plus the root module's parameters (embeddings, final norm, LM head), which FSDP2
  keeps gathered between forward and backward; with False (ZeRO-2-like) the whole model: c*P for a
  c-byte compute dtype. None where FSDP2 does not wrap the policy (one fp32 process, `fsdp_wraps`).
- gradients: sharded fp32, 4P/N; in backward the LM head's unsharded gradient, V*H*c, until the root's
  reduce-scatter (`transient`). Optimizer: fused AdamW exp_avg + exp_avg_sq in fp32, 8P/N.
- activations of one micro-batch (`activation_bytes`): what a Qwen2 block saves for backward, per token
  c*(6h + 2kv + 4i) + 8h bytes (h hidden, kv the K/V width, i the MLP width; 8h: RMSNorm's fp32 upcasts),
  counted with `saved_tensors_hooks` on a real block (tests/test_memory_plan.py). SwiGLU's wide MLP makes
  this about twice Korthikanti et al. 2022's 34*h. With checkpointing each block keeps only its input
  (c*h per token) and one block is recomputed in full during backward. Plus the backward's gradient
  temporaries of one block, c*(3i + 2h) per token.
- log-prob chunk (`logits`): the chunked LM head (logprobs.py) holds one fp32 [N, chunk x V / N] block of
  logits, two with the entropy (GRPO's training forward asks for it), never the full [tokens, V] tensor.
- CPU offload (FSDP2 CPUOffloadPolicy): the sharded params, grads and optimizer live in host memory
  (`cpu_bytes`); only the gathered copies stay on the device.
- LoRA (Hu et al. 2021): base weights are frozen, so they need no fp32 master, gradient or optimizer
  state; they are stored in the compute dtype, or for the block linear weights at 4.52 bits with NF4 and
  double quantization (Dettmers et al. 2023, "QLoRA"; grpo_fsdp/quant.py: one int8 scale per 64 values,
  one fp32 factor per 256 scales). Adapters add r*(in+out) params per targeted module and carry fp32
  weights, grads and Adam. An NF4 linear dequantizes its weight to the compute dtype for each matmul (the
  largest one, c*h*i, is counted in `transient`).
- Reference model (GRPO with algo.beta > 0, DPO with algo.precompute_ref=false; `models.build_reference`): the
  policy's weights in the compute dtype, frozen, sharded like the policy: c*P/N, on the host with CPU offload.
  None with LoRA (the reference is the policy with its adapters off) or DPO's cached reference log-probs.
- GRPO rollout engine: the transformers engine (`rollout/hf.py`) holds its own unsharded copy in the
  compute dtype, c*P, plus its KV cache, 2 * layers * kv * c bytes per position for every sequence
  decoded together (`rollout.max_batch_size`, default the rank's prompts x G) at prompt + completion
  length; vLLM reserves `hardware.vllm_memory_share` of the device (weights + KV cache). While the
  trainer works the engine sleeps (level 1 parks the weights in host memory, 2 drops them; on a CPU
  device level 1 keeps them in place), so a GRPO step has two peaks: training and generation.
  Under LoRA, and for a full fine-tune that FSDP2 does not wrap (one fp32 process, `fsdp_wraps`), the transformers
  engine has no copy (`rollout/shared.py`): it generates with the policy's own modules, which FSDP2 gathers whole
  for a LoRA rollout (every block and the root in the compute dtype, NF4 weights packed; the NF4 weights FSDP2
  leaves alone on one rank are resident anyway) and frees after; an unwrapped policy gathers nothing. Nothing of
  it stays while training.
- On a CPU device the host is the device: rank 0 also holds the full fp32 state dict it builds or
  reads while the shards fill (`loading`), which can be the peak of a LoRA run. The NF4 targets' fp32 entries
  leave the dict before the shards fill, but the pages stay with the process (measured), so the whole dict counts.
  Beside it only the start-up part of the runtime exists (`HOST_LOADING_RUNTIME_BYTES`).
- CUDA context (`cuda_context`): the driver's and the kernels' own memory, outside torch's allocator
  (0.5 GiB, the seed recipe's figure); torch.cuda.max_memory_allocated never counts it. On a CPU device the
  process's own runtime instead (`host_runtime`, 64 MiB measured: process group, data, threads).
- Backward frees activations as it fills gradients: with one micro-batch per optimizer step the training
  peak counts max(gradients, activations), with accumulation their sum.

`total` = max(training, generation) + CUDA context (or host runtime), or on a CPU device loading + the start-up
runtime when that is larger. Not counted: NCCL buffers, allocator fragmentation, the reference's gathered blocks
during its forward, Python objects and data.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_fsdp.config import ArchConfig, Config, DPOConfig, GRPOConfig
from grpo_fsdp.param_count import (
    has_attention_bias,
    kv_dim,
    lora_module_shapes,
    lora_param_count,
    param_breakdown,
    targeted_linear_params,
    vocab_size_of,
)

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 with double quantization (quant.py): 4 bits, one int8 scale per 64 values, one fp32 factor per 256 scales.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CUDA_CONTEXT_BYTES = GIB // 2
DENSE_NF4_SHARE = 0.25  # a rollout may hold dequantized NF4 bases up to this share of the free memory (rollout/shared.py)
# A CPU device's own runtime beside the tensors: the process group, the data and its tokens, the autograd and
# OpenMP threads. Measured: a GRPO step of a 0.5 M-parameter model grows the RSS by 62 MiB after the imports.
HOST_RUNTIME_BYTES = 64 * 2**20
# What of it exists when the weights load (config, tokenizer, data, process group, reward workers' pipes). Measured:
# 19.5 MiB above the post-import RSS when models.build_policy starts (the QLoRA step of tests/test_memory_plan.py).
HOST_LOADING_RUNTIME_BYTES = 20 * 2**20


def micro_batch_tokens(cfg: Config) -> tuple[int, int]:
    """(tokens through the network, tokens scored by the LM head) of one training micro-batch, at full length.

    GRPO with the shared-prefix layout (shared_prefix.py) runs each prompt once per micro-batch: the
    micro-batch of m completions spans ceil(m / G) prompts of data.max_prompt_length tokens plus m
    completions of algo.max_new_tokens; padded rows repeat the prompt. SFT rows are data.max_length long.
    """
    m, d = cfg.train.micro_batch_size, cfg.data
    if isinstance(cfg.algo, GRPOConfig):
        g = cfg.algo
        prompts = -(-m // g.group_size) if g.shared_prefix else m
        return prompts * d.max_prompt_length + m * g.max_new_tokens, m * g.max_new_tokens
    return m * d.max_length, m * d.max_length


def block_saved_bytes(arch: ArchConfig, c: int, tokens: int) -> int:
    """What one Qwen2 block saves for backward over `tokens` tokens in a c-byte compute dtype: h-wide tensors
    (the norms' outputs, q, the attention output), k and v, four i-wide MLP tensors (gate, SiLU, up, their
    product) and the RMSNorms' fp32 upcasts; tests/test_memory_plan.py counts them with saved_tensors_hooks."""
    h, i, kv = arch.hidden_size, arch.intermediate_size, kv_dim(arch)
    return tokens * (c * (6 * h + 2 * kv + 4 * i) + 8 * h)


def activation_bytes(arch: ArchConfig, c: int, tokens: int, checkpointing: bool) -> int:
    """Activations one micro-batch of `tokens` keeps for backward at its peak (module docstring), blocks only."""
    h, i = arch.hidden_size, arch.intermediate_size
    block = block_saved_bytes(arch, c, tokens)
    grads = tokens * c * (3 * i + 2 * h)  # gradient temporaries of the block in backward
    saved = arch.num_layers * tokens * h * c + block if checkpointing else arch.num_layers * block
    head_side = tokens * (4 * h + 2 * c * h)  # final norm (fp32 upcast, output), the head's [tokens, h] input
    return saved + grads + head_side


ONE_BLOCK_VOCAB = 4096  # logprobs._ONE_BLOCK_VOCAB, mirrored here to keep the plan torch-free (a test checks both)


def logits_bytes(vocab: int, chunk_size: int, scored: int, entropy: bool) -> int:
    """The chunked head's fp32 logits block(s): min(chunk, scored) x V, twice with the entropy (logprobs.py); a
    vocabulary of at most ONE_BLOCK_VOCAB tokens is one [scored, V] block (at most 16 KB a token)."""
    rows = scored if vocab <= ONE_BLOCK_VOCAB else min(chunk_size, scored)
    return rows * vocab * 4 * (2 if entropy else 1)


def kv_cache_bytes(cfg: Config, world_size: int) -> int:
    """The transformers engine's KV cache (rollout/kv_cache.py): every sequence decoded together, full length."""
    if not isinstance(cfg.algo, GRPOConfig):
        return 0
    arch, g = cfg.model.arch, cfg.algo
    c = DTYPE_BYTES[cfg.hardware.param_dtype]
    rows = g.prompts_per_step // world_size * g.group_size
    rows = min(rows, cfg.rollout.max_batch_size) if cfg.rollout.max_batch_size else rows
    return 2 * arch.num_layers * kv_dim(arch) * c * rows * (cfg.data.max_prompt_length + g.max_new_tokens)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (and per rank in host memory for `cpu_bytes`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # decoder blocks (+ the head's input), one micro-batch
    total: int  # the peak: max(training, generation) + CUDA context or host runtime; on a CPU device at least loading
    cpu_bytes: int  # host memory per rank, used by CPU offload
    params: int
    trainable_params: int
    world_size: int
    notes: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()  # overrides that would lower the total, shown when it does not fit
    reference: int = 0  # the frozen reference model's shard on the device (wants_reference_copy)
    engine: int = 0  # GRPO: the rollout engine on the device while it generates (weights + KV cache)
    training: int = 0  # weights + gradients + optimizer + activations + logits + transient + reference (+ awake engine)
    generation: int = 0  # GRPO: the trainer's resident shards and optimizer state + reference + engine; 0 without
    logits: int = 0  # the LM head's fp32 logits block(s) of one micro-batch
    transient: int = 0  # unsharded LM-head gradient in backward (full fine-tune), NF4 dequantized weight (4-bit)
    kv_cache: int = 0  # the transformers engine's KV cache, part of `engine`
    base_weights: int = 0  # LoRA: the frozen base on the device (4-bit or compute dtype), part of `weights`
    adapters: int = 0  # LoRA: the adapters on the device (fp32 shards + gathered copies), part of `weights`
    loading: int = 0  # CPU device: rank 0's full state dict + the shards while loading
    cuda_context: int = 0  # CUDA device: outside torch's allocator
    host_runtime: int = 0  # CPU device: the process's own memory beside the tensors (HOST_RUNTIME_BYTES)

    @property
    def host_total(self) -> int:
        """A CPU device's peak host memory (the plan's total); with CUDA, the host's share: offloaded state."""
        return self.cpu_bytes if self.cuda_context else self.total


def wants_reference_copy(cfg: Config) -> bool:
    """Whether the run builds a frozen copy of the weights (`models.build_reference`): GRPO with algo.beta > 0 and
    DPO with algo.precompute_ref=false, unless LoRA, whose reference is the policy with its adapters off."""
    if cfg.hardware.lora.enabled:
        return False
    if isinstance(cfg.algo, GRPOConfig):
        return cfg.algo.beta > 0
    return isinstance(cfg.algo, DPOConfig) and not cfg.algo.precompute_ref


def estimate_memory(cfg: Config, world_size: int, vocab_size: int | None = None) -> MemoryEstimate:
    """Estimate per-device memory; `vocab_size` overrides arch.vocab_size (e.g. a tokenizer's)."""
    hw, arch, n = cfg.hardware, cfg.model.arch, world_size
    c = DTYPE_BYTES[hw.param_dtype]
    vocab = vocab_size_of(arch, vocab_size)
    pb = param_breakdown(arch, attention_bias=has_attention_bias(cfg.model.name), vocab_size=vocab)
    p = pb.total
    notes: list[str] = []
    if not (vocab_size or arch.vocab_size):
        notes.append(f"vocab size taken as {vocab} (tokenizer not loaded)")

    # a policy FSDP2 does not wrap (one fp32 process, parallelize.shards) computes on its own parameters: no copies
    wrapped = fsdp_wraps(hw, n)
    gathered_layers = (min(2, pb.num_layers) if hw.reshard_after_forward else pb.num_layers) if wrapped else 0
    transient = 0
    nf4_resident = nf4_layer = 0
    if hw.lora.enabled:
        lora, skipped = lora_param_count(arch, hw.lora.rank, hw.lora.target_modules)
        if skipped:
            notes.append(f"LoRA targets not counted: {', '.join(skipped)}")
        lora_layer = lora // pb.num_layers  # exact: lora_param_count sums identical layers
        # quant.py quantizes the LoRA targets' weights; every other base weight is frozen in the compute dtype
        nf4_layer = targeted_linear_params(arch, hw.lora.target_modules) if hw.load_in_4bit else 0
        nf4_bytes = nf4_layer * NF4_BYTES
        plain_layer_bytes = (pb.layer_linear - nf4_layer + pb.layer_other) * c
        if hw.load_in_4bit and n == 1:  # parallelize.nf4_left_out: on one rank FSDP leaves NF4 weights on the device
            nf4_resident, layer_base = pb.num_layers * nf4_bytes, plain_layer_bytes
        else:
            layer_base = plain_layer_bytes + nf4_bytes
        if hw.load_in_4bit and nf4_layer < pb.layer_linear:
            notes.append(f"NF4 holds the LoRA targets' weights ({human_count(nf4_layer * pb.num_layers)} params); the other "
                         f"block linears stay in {hw.param_dtype} ({gib((pb.layer_linear - nf4_layer) * pb.num_layers * c)})")
        root_bytes = pb.root * c
        base_sharded = (pb.num_layers * layer_base + root_bytes) / n  # frozen base in its storage format
        adapter_sharded = 4 * lora / n  # fp32 master copy
        sharded = base_sharded + adapter_sharded
        base_gathered = gathered_layers * layer_base + root_bytes * wrapped + nf4_resident
        adapter_gathered = gathered_layers * lora_layer * c  # gathered adapters run in the compute dtype
        layer_bytes = layer_base + lora_layer * c
        trainable = lora
        if hw.load_in_4bit:  # linear_nf4 dequantizes the weight for each matmul: the largest targeted one
            transient = max(i * o for name, (i, o) in lora_module_shapes(arch).items()
                            if "all-linear" in hw.lora.target_modules or name in hw.lora.target_modules) * c
    else:
        layer_bytes, root_bytes = pb.per_layer * c, pb.root * c
        sharded = 4 * p / n  # fp32 master parameters
        trainable = p
        transient = vocab * arch.hidden_size * c  # the LM head's unsharded gradient until the root reduce-scatters
    gathered = gathered_layers * layer_bytes + root_bytes * wrapped + nf4_resident
    gradients = 4 * trainable / n  # fp32 reduce-scattered gradients (reduce_dtype float32)
    optimizer = 8 * trainable / n  # AdamW exp_avg + exp_avg_sq, fp32
    tokens, scored = micro_batch_tokens(cfg)
    activations = activation_bytes(arch, c, tokens, hw.activation_checkpointing)
    logits = logits_bytes(vocab, cfg.train.logprob_chunk_size, scored, isinstance(cfg.algo, GRPOConfig))

    cpu = 0
    if hw.cpu_offload:
        cpu = sharded + gradients + optimizer
        weights, gradients, optimizer = gathered, 0, 0
    else:
        weights = sharded + gathered
    if hw.lora.enabled:
        on_device = 0 if hw.cpu_offload else 1
        base_w, adapters_w = base_gathered + on_device * base_sharded, adapter_gathered + on_device * adapter_sharded
    else:
        base_w = adapters_w = 0

    reference, engine, kv, engine_awake = 0, 0, 0, 0
    resident = nf4_resident + (0 if hw.cpu_offload else sharded + optimizer)  # what stays on the device while generating
    if wants_reference_copy(cfg):  # models.build_reference: compute dtype, frozen, sharded like the policy
        reference = c * p / n
        why = f"algo.beta={cfg.algo.beta:g}" if isinstance(cfg.algo, GRPOConfig) else "algo.precompute_ref=false"
        notes.append(f"reference model ({why}): {hw.param_dtype}, frozen, sharded"
                     + (", on the host (CPU offload)" if hw.cpu_offload else ""))
        if hw.cpu_offload:
            cpu, reference = cpu + reference, 0
    if isinstance(cfg.algo, GRPOConfig):
        kv = kv_cache_bytes(cfg, n)
        # LoRA, or a policy FSDP2 does not wrap: the transformers engine runs the policy's own modules (gathered whole
        # by FSDP2 while it generates, if wrapped; rollout/factory.py engine_from_config decides alike)
        shares = hw.lora.enabled or not wrapped
        shared = (pb.num_layers * layer_bytes + root_bytes if wrapped else 0) if shares else None
        dense = 0  # QLoRA rollouts hold the NF4 bases dequantized while they run, where that fits (rollout/shared.py)
        if shares and nf4_layer:
            on_device = (0 if hw.cpu_offload else sharded) + nf4_resident + reference
            built = on_device + (CUDA_CONTEXT_BYTES if hw.device == "cuda" else 0)
            dense, dense_note = _dense_nf4(hw, nf4_layer * pb.num_layers * c, built)
            notes.append(dense_note)
        engine, asleep, note = _engine_bytes(cfg, c * p, kv, None if shared is None else shared + dense)
        notes.append(note)
        if hw.device != "cuda" and (cfg.rollout.sleep_level == 1 or cfg.rollout.engine == "vllm"):
            engine_awake = asleep  # a CPU engine keeps its weights while training (the KV cache is freed)
    parts = [round(x) for x in (weights, gradients, optimizer, activations)]
    # Backward frees activations as it fills gradients: with one micro-batch per optimizer step the two peak at
    # different moments (activations at its start, gradients at its end); with accumulation the gradients of the
    # earlier micro-batches are there for the whole backward of the next one.
    step_work = activations + logits + transient
    accumulates = cfg.train.global_batch_size > cfg.train.micro_batch_size * n  # more than one micro-batch per rank
    grads_and_work = gradients + step_work if accumulates else max(gradients, step_work)
    training = round(weights + optimizer + grads_and_work + reference + engine_awake)
    generation = round(resident + reference + engine) if engine else 0
    # A CPU device is the host: rank 0 builds (or reads) the full fp32 model beside the shards it fills (with a 4-bit
    # base the NF4 weights replace their fp32 entries first, models._add_lora, but the process keeps those pages)
    loading = 4 * p + round(sharded + nf4_resident) if hw.device != "cuda" else 0
    context, runtime = (CUDA_CONTEXT_BYTES, 0) if hw.device == "cuda" else (0, HOST_RUNTIME_BYTES)
    total = max(max(training, generation) + context + runtime, loading + HOST_LOADING_RUNTIME_BYTES if loading else 0)
    return MemoryEstimate(
        *parts, total=total, cpu_bytes=round(cpu), params=p,
        trainable_params=trainable, world_size=n, notes=tuple(notes), hints=tuple(_hints(cfg)), reference=round(reference),
        engine=round(engine), training=training, generation=generation, logits=logits, transient=round(transient),
        kv_cache=kv if engine else 0, base_weights=round(base_w), adapters=round(adapters_w), loading=loading,
        cuda_context=context, host_runtime=runtime,
    )  # fmt: skip


def _hints(cfg: Config) -> list[str]:
    hw, hints = cfg.hardware, []
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
    return hints


def fsdp_wraps(hw, world_size: int) -> bool:
    """Whether `parallelize` wraps the policy in FSDP2 (`parallelize.shards`, which this mirrors without importing
    torch; a test keeps the two in step): on 2 or more ranks, or on one with a lower param_dtype or CPU offload."""
    return world_size > 1 or hw.param_dtype != "float32" or hw.cpu_offload


def _engine_bytes(cfg: Config, weights: float, kv: int, shared: float | None = None) -> tuple[float, float, str]:
    """Device bytes of the GRPO rollout engine while it generates, what of it a CPU engine keeps while the
    trainer works (sleep level 1 does nothing there; the transformers engine's KV cache lives one call), and
    a note that says what was counted. `weights` is one unsharded copy in the compute dtype; `shared` (None: the
    engine has a copy) what FSDP2 gathers of the policy for a transformers engine that runs its modules (no copy).
    rollout.engine=auto resolves only at start-up (vLLM where it imports, as in docker/, else transformers),
    so it counts the larger of the two.
    """
    hw, kind = cfg.hardware, cfg.rollout.engine
    if hw.device == "cuda" and hw.gpu_memory_gib > 0:
        vllm = hw.vllm_memory_share * hw.gpu_memory_gib * GIB
        vllm_note = f"vLLM reserves hardware.vllm_memory_share={hw.vllm_memory_share:g} of the device ({gib(vllm)}, weights + KV cache)"
    else:  # vLLM on the CPU: its copy of the weights and the fixed hardware.vllm_kv_cache_gib
        vllm = weights + hw.vllm_kv_cache_gib * GIB
        vllm_note = f"vLLM holds its {hw.param_dtype} weights and a {hw.vllm_kv_cache_gib:g} GiB KV cache ({gib(vllm)})"
    asleep = "asleep while training (rollout.sleep_level=1 parks the weights in host memory, 2 drops them)"
    if shared is None:
        hf, hf_kept = weights + kv, weights
        hf_note = (f"the transformers engine holds its own unsharded {hw.param_dtype} copy of the weights "
                   f"({gib(weights)}) and a KV cache of {gib(kv)}, {asleep}")
    else:
        hf, hf_kept = shared + kv, 0
        gathered = (f"FSDP2 gathers them for the rollout ({gib(shared)}) and frees them after" if shared else
                    "the one-process policy is not sharded, nothing to gather")
        hf_note = (f"the transformers engine generates with the trainer's own modules, no copy of its own: {gathered}; "
                   f"KV cache {gib(kv)}")
    if kind == "hf":
        return hf, hf_kept, f"rollout engine: {hf_note}"
    if kind == "vllm":
        return vllm, vllm, f"rollout engine: {vllm_note}, {asleep}"
    return (max(hf, vllm), hf_kept if hf >= vllm else vllm,
            f"rollout engine (auto, the larger is counted): {vllm_note}, {asleep}; {hf_note}")


def _dense_nf4(hw, dense: float, built: float) -> tuple[float, str]:
    """(bytes, note) of the NF4 bases dequantized for a rollout: `SharedHFEngine` holds them when they take at most
    `DENSE_NF4_SHARE` of the memory free when it is built (`built` bytes are in use by then: the weights, no optimizer
    state yet), else dequantizes at every decode step. A CUDA plan decides on hardware.gpu_memory_gib; without a device
    size (the CPU: host memory) the plan counts them."""
    what = f"NF4 bases dequantized to {hw.param_dtype} once per rollout ({gib(dense)})"
    if hw.device == "cuda" and hw.gpu_memory_gib > 0:
        free = hw.gpu_memory_gib * GIB - built
        if dense > DENSE_NF4_SHARE * free:
            return 0, (f"NF4 bases dequantized at every decode step: {gib(dense)} dense would exceed "
                       f"{DENSE_NF4_SHARE:.0%} of the ~{gib(max(free, 0))} free when the engine starts")
        return dense, f"{what}: within {DENSE_NF4_SHARE:.0%} of the ~{gib(free)} free when the engine starts"
    return dense, f"{what}, counted: the engine holds them where they take at most {DENSE_NF4_SHARE:.0%} of the free memory"


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x >= GIB / 2 else f"{x / 2**20:.1f} MiB"


def human_count(x: int) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e8 else f"{x / 1e6:.2f} M"
