"""One function: activation checkpointing -> torch.compile -> FSDP2 `fully_shard`, over a plain module.

The order matters and follows torchtitan: checkpoint wrappers go innermost (so recomputation
happens inside the block FSDP has already gathered), compile wraps each block (so graph breaks
stay inside one block and FSDP's hooks stay outside the graph), and `fully_shard` goes on each
block and then on the root (embeddings, final norm and LM head form the root's group).

- `reshard_after_forward=True` is FULL_SHARD: each block's parameters are freed after its forward
  and all-gathered again in backward. `False` is the ZeRO-2-like profile: parameters stay gathered
  from forward to backward (one all-gather per step, full compute-dtype weights held).
- The last block and the root never reshard after forward: backward needs them at once.
- Gradients are SUM-reduced (divide factor 1): the loss is already divided by the all-reduced
  token count of the whole step, so FSDP must not divide by the world size again.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from grpo_fsdp.config import HardwareConfig
from grpo_fsdp.policy import Policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parallelize(policy: Policy, hw: HardwareConfig, mesh: DeviceMesh) -> Policy:
    layers = policy.layers
    # 1. activation checkpointing, one decoder block at a time (non-reentrant: works with FSDP2)
    if hw.activation_checkpointing:
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    # 2. compile each block in place (module.compile keeps parameter names unchanged)
    if hw.compile:
        for block in layers:
            block.compile()
    # 3. shard: blocks first, then the root
    param_dtype, reduce_dtype = DTYPES[hw.param_dtype], DTYPES[hw.reduce_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype) if param_dtype != torch.float32 else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=hw.device == "cuda") if hw.cpu_offload and hw.device == "cuda" else OffloadPolicy()
    for i, block in enumerate(layers):
        reshard = hw.reshard_after_forward and i < len(layers) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    fully_shard(policy, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    for module in (*layers, policy):  # per FSDP module: each holds its own parameter group
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return policy
