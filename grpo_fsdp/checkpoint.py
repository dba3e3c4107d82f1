"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP), and resume.

Layout of `<run_dir>/checkpoints/step_000120/`:
  .metadata, __<rank>_0.distcp   model + optimizer shards (DCP; resharding on load is free)
  trainer_state.json             step, data position, scheduler, Python RNG (rank 0's view)
  rng_rank<r>.safetensors        each rank's torch (and CUDA) generator state
  model/                         config.json + tokenizer, so `grpo_fsdp.export` needs nothing else
                                 (+ lora.json under LoRA: adapter config, base model, whether it was NF4)

Under LoRA the shards hold the adapters and their optimizer state only: the frozen base is not trainer
state, it is rebuilt from `model.path` at every start (NF4 quantization is deterministic), so resuming is
exact and a checkpoint is megabytes.
  MANIFEST.json                  every file's size, and the sha256 of all but the big .distcp shards
  COMPLETE                       written last

Atomicity: everything is written into `step_000120.partial/`, then rank 0 writes COMPLETE and
renames the directory (one `rename`, atomic on POSIX). A crash at any point before the rename
leaves a `.partial` directory that `latest()` ignores and the next save deletes, so the previous
checkpoint stays loadable.

Verification and fallback (`Checkpointer.resume`): before loading, rank 0 checks the directory
against its manifest (a truncated shard, garbage `.metadata`, an edited `trainer_state.json`) and
all ranks receive its verdict. With `checkpoint.resume=auto` a checkpoint that fails, or whose
load fails inside DCP, is skipped with one warning line and the next older one is tried; once one
loads, the skipped ones are renamed `step_N.corrupt` (kept for inspection, never loaded or pruned,
and no longer counted by `keep_last`). With `resume=<dir>` a failure is one error line (exit 2).
When none loads, nothing is renamed and the run stops: a run never silently restarts at step 0
over damaged checkpoints. A checkpoint from before manifests (COMPLETE but no MANIFEST.json) is
accepted unverified, as before; its `trainer_state.json` must still parse, and a DCP failure still
ends in one line.

The run directory for `resume=auto` without `run_dir` is stable for the same command
(`resume_key`, `distributed.agree_run_dir`): the Slurm job id (kept across requeues), else a
torchrun rendezvous id given with --rdzv_id, else a hash of the composed config minus the fields
that do not change the run (`run_dir`, `dry_run`, `checkpoint.*`, `logging.*`). Without `auto` each
launch gets a new timestamped directory, so running a command twice never overwrites a finished run.

Beside the step directories: `best/` (the step whose `checkpoint.best_metric` was best, never pruned,
never chosen by `resume=auto`) and `latest.json` (step and path of the newest complete save, written
atomically after it completes); see best_checkpoint.py.

Nothing is unpickled from the files: DCP's `.metadata` is a pickle, so it is read with an
unpickler that only admits DCP's own metadata classes; tensors come from safetensors or
`torch.load(weights_only=True)` inside DCP; our own state is JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from grpo_fsdp import distributed
from grpo_fsdp.best_checkpoint import best_info, better, publish_best, write_latest
from grpo_fsdp.cli import UserError
from grpo_fsdp.faults import maybe_fault

MANIFEST = "MANIFEST.json"
LORA_INFO = "lora.json"  # model/lora.json in a LoRA run's checkpoints (export.py reads it)
# Only trainable parameters are saved: everything for a full fine-tune; the adapters alone under LoRA, whose
# frozen base (NF4 or not) is rebuilt from model.path at every start, bit for bit (quantization is deterministic).
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
RESTORE = StateDictOptions(ignore_frozen_params=True, strict=False)  # DCP already refused a checkpoint lacking a key
_STEP_DIR = re.compile(r"step_\d+")  # not step_N.partial (a torn save) nor step_N.corrupt (moved aside)

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
    def __init__(self, root: str | Path, keep_last: int, best_metric: str = "", best_mode: str = "max"):
        self.root, self.keep_last = Path(root), keep_last
        self.best_metric, self.best_mode = best_metric, best_mode
        self._best: float | None = None  # rank 0's best value so far (read from best/BEST.json at the first eval)
        self._best_read, self._warned = False, False
        self._pending: tuple[int, float] | None = None  # (step, value) of an improvement not yet saved as best

    def observe(self, step: int, metrics: dict[str, float], scheduled: bool) -> bool:
        """Note this step's evaluation; True on every rank when `best_metric` improved, so the caller saves
        this step (which then becomes `best/`). Call it on every rank at every step: `metrics` is the eval
        rank's eval metrics ({} elsewhere), `scheduled` whether an evaluation was due at this step (the same on
        every rank). A collective only on scheduled steps, where the other ranks wait for the eval rank anyway."""
        if not self.best_metric or not scheduled:
            return False
        values = distributed.all_gather_object(metrics.get(self.best_metric))
        value = next((float(v) for v in values if v is not None), None)
        improved = None
        if dist.get_rank() == 0:
            if not self._best_read:  # a resumed run competes with the best of its earlier part
                info = best_info(self.root) or {}
                same = info.get("metric") == self.best_metric and info.get("mode") == self.best_mode
                self._best, self._best_read = (float(info["value"]) if same else None), True
            improved = value is not None and better(value, self._best, self.best_mode)
            if value is None and not self._warned:  # e.g. a typo in the metric's name: say so once, train on
                self._warned = True
                print(f"warning: checkpoint.best_metric={self.best_metric} is not among the metrics of the evaluation at "
                      f"step {step}; no best/ checkpoint is kept (names: eval/<task>/accuracy, .../pass@<k>, ...)",
                      file=sys.stderr, flush=True)
        if improved := distributed.broadcast_object(improved):
            self._pending = (step, value)
        return improved

    def complete(self) -> list[Path]:
        """Complete checkpoints under the root, oldest first (verified or not)."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        done = self.complete()
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
        model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINABLE)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(partial)))
        maybe_fault("during_checkpoint_write", step)
        save_file(_rng_tensors(), str(partial / f"rng_rank{rank}.safetensors"))
        if rank == 0:
            state = TrainerState(step, data_position, _jsonable(scheduler.state_dict()), _to_lists(random.getstate()))
            (partial / "trainer_state.json").write_text(json.dumps(state.__dict__))
            hf_config.save_pretrained(partial / "model")
            tokenizer.save_pretrained(partial / "model")
            if (lora := getattr(model, "lora_info", None)) is not None:  # what `grpo_fsdp.export` needs for the adapters
                (partial / "model" / LORA_INFO).write_text(json.dumps(lora, indent=1))
        dist.barrier()
        if rank == 0:
            write_manifest(partial)  # every rank's files are in place (barrier above)
            (partial / "COMPLETE").write_text(str(step))
            if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            maybe_fault("before_latest_pointer", step)
            write_latest(self.root, step, final)  # only now: the pointer never names an unfinished save
            self._prune()
            if self._pending is not None and self._pending[0] == step:
                publish_best(self.root, final, {"metric": self.best_metric, "mode": self.best_mode,
                                                "value": self._pending[1], "step": step})
                self._best = self._pending[1]
        self._pending = None
        dist.barrier()
        return final

    def load(self, path: str | Path, model, optimizer, scheduler) -> TrainerState:
        """Verify `path`, then load it into model, optimizer, scheduler and the RNGs. UserError (one
        line, the same on every rank) when it is unusable."""
        path = Path(path)
        problem = distributed.broadcast_object(verify(path) if dist.get_rank() == 0 else None)
        if problem is not None:
            raise UserError(f"checkpoint {path} is unusable: {problem}")
        model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINABLE)
        state = {"model": model_sd, "optim": optim_sd}
        error = None
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
        # damaged files raise anything; DCP's CheckpointException (every rank's failure) is a BaseException
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            error = _one_line(e)
        errors = distributed.all_gather_object(error)  # DCP gathers its own errors; this covers anything else
        if error := next((e for e in errors if e is not None), None):
            raise UserError(f"checkpoint {path} is unusable: reading its model/optimizer shards failed: {error}")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=RESTORE)
        meta = _read_trainer_state(path)
        scheduler.load_state_dict(meta.scheduler)
        random.setstate(_to_tuples(meta.python_rng))
        rng_file = path / f"rng_rank{dist.get_rank()}.safetensors"
        if rng_file.exists():  # absent when resuming on more ranks than saved: keep fresh seeds
            _set_rng(load_file(str(rng_file)))
        return meta

    def resume(self, spec: str, model, optimizer, scheduler) -> tuple[int, str]:
        """Apply `checkpoint.resume` (none | auto | a step_* directory | a run or checkpoints directory).
        Returns the step to start at and the lines to print; every rank gets the same answer."""
        if spec == "none":
            return 0, "starting at step 0 (checkpoint.resume=none)"
        if spec != "auto":
            path = Path(spec)
            if _STEP_DIR.fullmatch(path.name) or (path / "COMPLETE").exists() or path.name.endswith(".partial"):
                try:
                    step = self.load(path, model, optimizer, scheduler).step
                    return step, f"resumed at step {step} from {path}"
                except UserError as e:
                    raise UserError(f"checkpoint.resume={spec} is unusable: {_why(e, path)}; pass another step_* "
                                    "directory, or checkpoint.resume=auto for the newest one that loads") from None
            under = Checkpointer(path / "checkpoints" if (path / "checkpoints").is_dir() else path, self.keep_last)
            if not under.complete():  # named explicitly: never a silent start at step 0
                raise UserError(f"checkpoint.resume={spec} holds no complete step_* checkpoint (nor does its "
                                "checkpoints/); pass a step_* directory, or checkpoint.resume=auto with its run_dir")
            return under.resume("auto", model, optimizer, scheduler)  # a run directory: its newest that loads
        candidates = self.complete()[::-1]
        if not candidates:
            return 0, f"no checkpoint under {self.root}; starting at step 0"
        skipped: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                meta = self.load(path, model, optimizer, scheduler)
            except UserError as e:
                skipped.append((path, _why(e, path)))
                continue
            lines = [f"warning: checkpoint {bad} is unusable ({why}); moved aside to {self._move_aside(bad)}"
                     for bad, why in skipped]
            legacy = "" if (path / MANIFEST).exists() else f" (no {MANIFEST}: written before manifests, not verified)"
            return meta.step, "\n".join([*lines, f"resumed at step {meta.step} from {path}{legacy}"])
        newest, why = skipped[0]
        raise UserError(f"checkpoint.resume=auto: none of the {len(skipped)} checkpoints under {self.root} loads "
                        f"(newest, {newest.name}: {why}); move the damaged ones away, or start afresh with another "
                        "run_dir")

    def _move_aside(self, path: Path) -> Path:
        target = None
        if dist.get_rank() == 0:
            target, n = path.with_name(path.name + ".corrupt"), 1
            while target.exists():  # an earlier damaged copy of the same step stays too
                n += 1
                target = path.with_name(f"{path.name}.corrupt{n}")
            os.replace(path, target)
        return distributed.broadcast_object(target)

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*")
                  if _STEP_DIR.fullmatch(p.name) and p.is_dir() and (p / "COMPLETE").exists())


def write_manifest(directory: Path) -> None:
    """MANIFEST.json: each file's size; a sha256 for all but the .distcp shards (large, and read whole by
    DCP anyway: a truncated shard shows in its size)."""
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE")):
        entry = {"size": f.stat().st_size}
        if f.suffix != ".distcp":
            entry["sha256"] = _sha256(f)
        files[f.relative_to(directory).as_posix()] = entry
    (directory / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def verify(path: Path) -> str | None:
    """What is wrong with checkpoint directory `path`, in a few words; None when nothing is found."""
    if not path.is_dir():
        return "no such directory"
    if not (path / "COMPLETE").exists():
        return "no COMPLETE marker (an interrupted save)"
    if (path / MANIFEST).exists():
        try:
            files = json.loads((path / MANIFEST).read_text())["files"]
            checks = [(rel, int(e["size"]), e.get("sha256")) for rel, e in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"its {MANIFEST} is unreadable"
        for rel, size, digest in checks:
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if (actual := f.stat().st_size) != size:
                return f"{rel} has {actual} bytes where {size} were written"
            if digest is not None and _sha256(f) != digest:
                return f"{rel} differs from what was written (sha256 mismatch)"
    try:
        _MetadataUnpickler(io.BytesIO((path / ".metadata").read_bytes())).load()  # small; DCP reads it first
    except Exception as e:  # noqa: BLE001  garbage fails to unpickle in many ways
        return f".metadata is unreadable ({_one_line(e)})"
    try:
        _read_trainer_state(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"trainer_state.json is unreadable ({_one_line(e)})"
    return None


def resume_key(cfg) -> str | None:
    """The suffix of a default run directory that the same command finds again (checkpoint.resume=auto);
    None for the other resume modes, which get a new timestamped directory. See the module docstring."""
    if cfg.checkpoint.resume != "auto":
        return None
    if job := distributed.job_id():
        return job
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    for run_specific in ("run_dir", "dry_run", "checkpoint", "logging"):
        tree.pop(run_specific, None)
    return "cfg" + hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))



def _why(e: UserError, path: Path) -> str:
    return str(e).removeprefix(f"checkpoint {path} is unusable: ")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    """A failure in one line: DCP's CheckpointException carries each rank's exception and traceback."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = next(iter(failures.items()))
        return f"rank {rank}: {_one_line(inner)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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
