"""One function: torch.compile -> activation checkpointing -> FSDP2 `fully_shard`, over a plain module.

One process without mixed precision or offload is not sharded (`shards`): `fully_shard` is skipped and the
parameters stay plain tensors. There FSDP2 does nothing useful (one rank: no memory saved, no gradient to
reduce; fp32 everywhere: no cast; no offload) and its work still costs: the per-block pre/post-forward and
backward hooks, the one-rank all-gather and reduce-scatter copies and DTensor dispatch took ~18% of DPO's
forward + backward on the benchmark's default micro-batches and ~9% on 600-token prompts (one CPU thread,
benchmarks/README.md, 2026-11-30). Everything downstream takes both kinds of parameter (`distributed.full_tensor`,
DCP checkpoints keyed by the same names, so a checkpoint of either kind loads into the other). A bf16/fp16
`param_dtype` (FSDP2 casts for the forward) or `cpu_offload` keeps FSDP2 on one process too; NF4 weights were
left out of FSDP2 on one process before (`nf4_left_out`), so a 4-bit fp32 run is plain as well.

The order matters: compile goes on each block (so graph breaks stay inside one block and FSDP's hooks
stay outside the graph), checkpoint wrappers go around the compiled block (so recomputation happens
inside the block FSDP has already gathered, and re-runs the compiled code), and `fully_shard` goes
on each block and then on the root (embeddings, final norm and LM head form the root's group).

Departure from torchtitan, which compiles the checkpointed block (AC innermost, so that inductor can
plan the recomputation): our shared-prefix attention is a graph break (attention.py), and a graph
break inside a checkpointed region makes Dynamo run the whole region eagerly, so with both options
on (the h100x2 profile) no GRPO block was compiled at all (measured: 2 ops captured per run instead
of the blocks' projections, norms, rotary and MLP). Compiled inside the checkpoint, every block is.

- `reshard_after_forward=True` is FULL_SHARD: each block's parameters are freed after its forward
  and all-gathered again in backward. `False` is the ZeRO-2-like profile: parameters stay gathered
  from forward to backward (one all-gather per step, full compute-dtype weights held).
- Compiled blocks take the shared-prefix layout with its attention run eagerly (a graph break, see
  attention.py): traced, its per-micro-batch structure exhausted Dynamo's recompile limit.
- The last block and the root never reshard after forward: backward needs them at once.
- `cpu_offload`: FSDP2's CPUOffloadPolicy on every group (on a CPU-only run too, where it moves nothing).
- NF4 base weights (LoRA with hardware.load_in_4bit, quant.py) are sharded like any parameter, in their
  packed 4-bit form, except on one rank, where FSDP leaves them alone (`nf4_left_out`).
- Gradients are SUM-reduced (divide factor 1): the loss is already divided by the all-reduced
  token count of the whole step, so FSDP must not divide by the world size again.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from grpo_fsdp.config import HardwareConfig
from grpo_fsdp.policy import Policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shards(hw: HardwareConfig, world_size: int) -> bool:
    """Whether `parallelize` applies FSDP2: on 2 or more ranks, or on one when FSDP2 still does something there
    (casts parameters to a lower `param_dtype` for the forward, or offloads them to the CPU)."""
    return world_size > 1 or mixed_precision(hw) is not None or hw.cpu_offload


def mixed_precision(hw: HardwareConfig) -> MixedPrecisionPolicy | None:
    """FSDP2's cast policy, None when it casts nothing (fp32 compute: `reduce_dtype` then applies to nothing
    either, as before: fp32 parameters reduce fp32 gradients)."""
    param_dtype, reduce_dtype = DTYPES[hw.param_dtype], DTYPES[hw.reduce_dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype) if param_dtype != torch.float32 else None


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `parallelize` wrapped `module` in FSDP2 (its parameters are DTensors)."""
    return isinstance(module, FSDPModule)


def parallelize(policy: Policy, hw: HardwareConfig, mesh: DeviceMesh, compile_backend: str = "inductor",
                shard: bool | None = None) -> Policy:
    """Wrap `policy` in place (see the module docstring); `compile_backend` is torch.compile's backend
    ("aot_eager" lets CPU tests trace the blocks without generating kernels). `shard`: apply FSDP2 or not;
    None decides by `shards(hw, mesh.size())` (tests force True to run FSDP2's one-rank path)."""
    layers = policy.layers
    for i, block in enumerate(layers):
        # 1. compile each block in place (module.compile keeps parameter names unchanged)
        if hw.compile:
            block.compile(backend=compile_backend)
        # 2. activation checkpointing around it, one decoder block at a time (non-reentrant: works with FSDP2)
        if hw.activation_checkpointing:
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    # 3. shard: blocks first, then the root; not at all where FSDP2 would do nothing (one plain process)
    if not (shards(hw, mesh.size()) if shard is None else shard):
        return policy
    mp = mixed_precision(hw) or MixedPrecisionPolicy()
    # On a CPU run the offload policy moves nothing, but it is the same FSDP2 code path as on a GPU (sharded
    # parameters and gradients as CPU tensors, copied to the compute device around each use), so CPU tests
    # exercise it; pinning needs CUDA.
    offload = CPUOffloadPolicy(pin_memory=hw.device == "cuda") if hw.cpu_offload else OffloadPolicy()
    ignored = nf4_left_out(policy, mesh)
    for i, block in enumerate(layers):
        reshard = hw.reshard_after_forward and i < len(layers) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    fully_shard(policy, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    for module in (*layers, policy):  # per FSDP module: each holds its own parameter group
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return policy


def nf4_left_out(policy: Policy, mesh: DeviceMesh) -> set[torch.nn.Parameter] | None:
    """NF4 base weights (quant.py) that FSDP must not manage: all of them on a one-rank mesh, none otherwise.

    FSDP2's one-rank shortcut in torch 2.13 (`FSDPParamGroup.wait_for_unshard`, world_size == 1) copies only
    the first all-gather input of a tensor subclass, and an NF4 weight has three (packed values, scales,
    scale factors), so its forward fails there. Sharding one rank saves nothing: the weights stay plain NF4
    parameters on the compute device instead. With 2 or more ranks FSDP shards them (NF4Tensor implements
    FSDP2's all-gather hooks)."""
    from grpo_fsdp.quant import is_nf4

    if mesh.size() > 1:
        return None
    nf4 = {p for p in policy.parameters() if is_nf4(p)}
    return nf4 or None
