"""Process group, device mesh and rank helpers: the only module that knows about torchrun.

One code path for one process and for N: without torchrun's environment we still create a
process group (world size 1, in-process store), so the all-reduced loss denominator and distributed
checkpoints run exactly as they do on a cluster (FSDP2 too, unless it would do nothing: parallelize.shards).
`gloo` on CPU, `nccl` on GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from grpo_fsdp import peers


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def eval_rank(self) -> int:
        """Rank 1 evaluates between steps (time slicing); rank 0 when alone."""
        return 1 if self.world_size > 1 else 0


def launched_world_size() -> int:
    """World size torchrun set up (1 without torchrun); usable before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str, timeout_s: float = 1800.0, cpu_offload: bool = False) -> Dist:
    """Join (or, alone, create) the process group and build a 1-D mesh over all ranks.

    `timeout_s` (`hardware.collective_timeout_s`) bounds how long a collective waits for a rank that
    does not arrive. gloo raises in the waiting rank, and `cli.run_main` turns that into one line
    naming the rank that stopped answering (`peers.py`). NCCL honours it only through its watchdog,
    which aborts the communicator and ends the process when `TORCH_NCCL_ASYNC_ERROR_HANDLING` is on:
    torchrun sets 1 for its workers, and so do we for any other launcher unless the user chose.

    `cpu_offload` (hardware.cpu_offload) on CUDA: the group gets a gloo backend for CPU tensors beside NCCL
    (`cpu:gloo,cuda:nccl`, as torchtitan does), since FSDP2's offloaded shards and gradients are CPU tensors and
    gradient clipping, `full_tensor()` and the weight sync run collectives on them."""
    rank, world = int(os.environ.get("RANK", "0")), launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    nccl = backend == "nccl"
    if nccl and cpu_offload:
        backend = "cpu:gloo,cuda:nccl"
    if nccl:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:  # torchrun (or Slurm via torchrun)
            dist.init_process_group(backend, timeout=timeout, device_id=device if device_type == "cuda" else None)
            _launched["group"] = True
        else:  # one process: an in-process store, no port to pick
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    peers.start(timeout_s, watch=nccl)  # heartbeats through torchrun's store: who stopped answering
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh)


_launched = {"group": False}


def launched_group() -> bool:
    """Whether this process started a process group of torchrun's (cli.run_main ends such a process without the
    interpreter's finalization)."""
    return _launched["group"]


def shutdown() -> None:
    """Destroy the process group: the last step of a recipe's teardown (`recipes/teardown.py`), after
    the engine (vLLM's teardown uses the group), the reward workers and the logger (whose clean close
    is a collective). The heartbeat keeps beating until the process exits."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order. One process gets `[obj]` without a collective: gloo copies a
    gathered payload above 32k elements with an OpenMP loop in its own thread, and that second OpenMP team makes
    libgomp count more threads than cores and throttle its spin-wait for good (GOMP_SPINCOUNT 300,000 -> 1,000):
    every later small op of the main thread then waits for a sleeping worker to wake. Measured in one fp32 process
    on 2 cores (AMD EPYC, OMP_NUM_THREADS=2): a [64, 128] x [128, 384] linear 70 -> 230-500 us after the first
    rollout's gather, the default GRPO preset's decode steps ~2.5x slower from step 2 on (issue 13)."""
    if dist.get_world_size() == 1:
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (only ever our own in-memory objects; one process: no
    collective, see `all_gather_object`)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def job_id() -> str | None:
    """An id the scheduler keeps for the same job across restarts: the Slurm job (array task) id, which a
    requeue keeps, else a rendezvous id given to torchrun (--rdzv_id). `torchrun --standalone` draws a
    random uuid per launch, and a plain torchrun says "none": neither names a job."""
    if job := os.environ.get("SLURM_JOB_ID"):
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm{array}_{task}" if array and task else f"slurm{job}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none" or re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", run_id):
        return None
    return "rdzv" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


def agree_run_dir(requested: str, default_name: str, stable_key: str | None = None) -> str:
    """All ranks must write into one run directory: rank 0 decides, the rest receive it. Without
    `requested`: `outputs/<default_name>-<stable_key>` when a key is given (the same command finds its
    checkpoints again: `checkpoint.resume_key`), else a new timestamped directory per launch."""
    chosen = requested
    if not chosen and dist.get_rank() == 0:
        suffix = stable_key or f"{datetime.now():%Y%m%d-%H%M%S}"
        chosen = os.path.join("outputs", f"{default_name}-{suffix}")
    return broadcast_object(chosen)


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum a Python number over ranks (in float64 so token counts stay exact)."""
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (e.g. a SIGTERM that reached one process)."""
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: an FSDP2 DTensor shard all-gathered (a collective: every rank calls it), a plain tensor (the
    unsharded one-process path, parallelize.shards) as it is. The one place that tells the two apart."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
