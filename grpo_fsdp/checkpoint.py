"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP), and resume.

Layout of `<run_dir>/checkpoints/step_000120/`:
  .metadata, __<rank>_0.distcp   model + optimizer shards (DCP; resharding on load is free)
  trainer_state.json             step, data position, scheduler, Python RNG (rank 0's view)
  rng_rank<r>.safetensors        each rank's torch (and CUDA) generator state
  model/                         config.json + tokenizer, so `grpo_fsdp.export` needs nothing else
  COMPLETE                       written last

Atomicity: everything is written into `step_000120.partial/`, then rank 0 writes COMPLETE and
renames the directory (one `rename`, atomic on POSIX). A crash at any point before the rename
leaves a `.partial` directory that `latest()` ignores and the next save deletes, so the previous
checkpoint stays loadable.

Nothing is unpickled from the files: DCP's `.metadata` is a pickle, so it is read with an
unpickler that only admits DCP's own metadata classes; tensors come from safetensors or
`torch.load(weights_only=True)` inside DCP; our own state is JSON.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from grpo_fsdp.cli import UserError
from grpo_fsdp.faults import maybe_fault

# Whole modules whose classes are plain metadata records, plus single names elsewhere.
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}
_ALLOWED_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    *(("builtins", n) for n in ("set", "frozenset", "slice", "complex")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = module in _ALLOWED_MODULES or (module, name) in _ALLOWED_NAMES
        if allowed or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never does")


class SafeFileSystemReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled with an allow-list of classes."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    data_position: int  # global batches consumed (equals step for SFT)
    scheduler: dict
    python_rng: list


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial") and (p / "COMPLETE").exists())
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, scheduler, data_position: int, hf_config, tokenizer) -> Path:
        final = self.root / f"step_{step:06d}"
        partial = final.with_name(final.name + ".partial")
        rank = dist.get_rank()
        if rank == 0:
            for stale in self.root.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(partial)))
        maybe_fault("during_checkpoint_write", step)
        save_file(_rng_tensors(), str(partial / f"rng_rank{rank}.safetensors"))
        if rank == 0:
            state = TrainerState(step, data_position, _jsonable(scheduler.state_dict()), _to_lists(random.getstate()))
            (partial / "trainer_state.json").write_text(json.dumps(state.__dict__))
            hf_config.save_pretrained(partial / "model")
            tokenizer.save_pretrained(partial / "model")
        dist.barrier()
        if rank == 0:
            (partial / "COMPLETE").write_text(str(step))
            if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()
        dist.barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> TrainerState:
        if not (path / "COMPLETE").exists():
            raise UserError(f"checkpoint {path} is incomplete (no COMPLETE marker); resume from an earlier step_* directory")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
        scheduler.load_state_dict(meta.scheduler)
        random.setstate(_to_tuples(meta.python_rng))
        rng_file = path / f"rng_rank{dist.get_rank()}.safetensors"
        if rng_file.exists():  # absent when resuming on more ranks than saved: keep fresh seeds
            _set_rng(load_file(str(rng_file)))
        return meta

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / "COMPLETE").exists())
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
