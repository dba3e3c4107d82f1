"""Run logging: console progress bar, `<run_dir>/metrics.jsonl`, W&B, and GPU/process metrics.

Only rank 0 logs. Other ranks get a `NullLogger` with the same methods doing nothing, so the
training loop calls `logger.log(...)` unconditionally instead of testing the rank (DESIGN.md).

Step convention: `step` counts optimizer steps completed (the first logged step is 1, as in
checkpoint names `step_000001`); a run resumed after N completed steps passes `start_step=N`,
logs from step N+1 on, and its progress bar starts at N. Lines already in metrics.jsonl with
`step > start_step` came from work the checkpoint does not contain, so they are dropped before
appending (atomically, via a temp file and `os.replace`).

Every key must be namespaced (`train/`, `rollout/`, `reward/`, `eval/`, `perf/`, `system/`); a
bare key is a programming error and raises. Non-finite floats are written to metrics.jsonl as
`null` so the file stays standard JSON (readable by jq and strict parsers); W&B receives the
raw value.

Departure from DESIGN.md: W&B is written by rank 0 only, not by every rank into a shared run.
The run id is kept in `<run_dir>/wandb_id.txt`, which is what a shared-mode run would need.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any

from grpo_fsdp.config import LoggingConfig

NAMESPACES = ("train/", "rollout/", "reward/", "eval/", "perf/", "system/")
GIB = float(1 << 30)

# Keys shown in the progress-bar postfix: (metric key, label, format).
_POSTFIX = (("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"), ("perf/tokens_per_s", "tok/s", "{:.0f}"))


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key.startswith(NAMESPACES) or key.endswith("/"):
        raise ValueError(f"metric key {key!r} is not namespaced: prefix it with one of {', '.join(NAMESPACES)}")


def _to_number(key: str, value: Any) -> int | float:
    """Plain Python numbers for JSON and W&B; 0-d tensors and numpy scalars go through .item()."""
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metric {key!r} has value {value!r} of type {type(value).__name__}; log numbers only")


def _json_safe(value: float) -> int | float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Keep only lines with step <= start_step. A torn last line (crash mid-write) is dropped too."""
    if not path.exists():
        return
    kept, changed = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and int(row["step"]) <= start_step
            except (ValueError, KeyError, TypeError):
                keep = False
            changed |= not keep or not line.endswith("\n")
            if keep:
                kept.append(line.rstrip("\n") + "\n")
    if changed:  # rewrite only when needed: the common case then costs a single read
        _atomic_write(path, "".join(kept))


def _parse_config(config_yaml: str) -> dict:
    import yaml

    try:
        parsed = yaml.safe_load(config_yaml)
    except yaml.YAMLError:  # W&B then shows no config; config.yaml still holds the text
        return {}
    return parsed if isinstance(parsed, dict) else {}


class RunLogger:
    """Rank-0 logger: metrics.jsonl (append), tqdm bar on stderr, optional W&B run."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        config_yaml: str,
        total_steps: int,
        run_name: str,
        world_size: int,
        start_step: int = 0,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.world_size = world_size
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.run_dir / "config.yaml", config_yaml)

        self.metrics_path = self.run_dir / "metrics.jsonl"
        _truncate_metrics(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 -- held until close()
        self._postfix: dict[str, str] = {}
        self._closed = False

        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            # Without a terminal (Slurm logs) every refresh becomes a line; refresh rarely there.
            interactive = sys.stderr.isatty()
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=run_name,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0,
                unit="step",
            )

        self._wandb = None
        self.wandb_run_id: str | None = None
        if cfg.wandb:
            try:
                self._init_wandb(config_yaml, run_name)
            except BaseException:
                self.close(exit_code=1)  # do not leave the bar drawn and the file open
                raise

    def _init_wandb(self, config_yaml: str, run_name: str) -> None:
        import wandb  # imported here: it is slow to import and most test runs never need it

        id_path = self.run_dir / "wandb_id.txt"
        run_id = id_path.read_text().strip() if id_path.exists() else ""
        if not run_id:
            # Our own 8-char base-36 id, W&B's format: wandb 0.31 no longer exports generate_id.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            _atomic_write(id_path, run_id + "\n")
        config = _parse_config(config_yaml)
        config.setdefault("world_size", self.world_size)
        self._wandb = wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity or None,
            name=run_name,
            dir=str(self.run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )
        self.wandb_run_id = self._wandb.id

    # ------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one line `{"step": step, **metrics}`, refresh the bar, and send to W&B."""
        values = {}
        for key, value in metrics.items():
            _check_key(key)
            values[key] = _to_number(key, value)
        row = {"step": int(step), **{k: _json_safe(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a crash loses at most the line being written

        if self._bar is not None:
            for key, label, fmt in _POSTFIX:
                if key in values:
                    self._postfix[label] = fmt.format(values[key])
            if self._postfix:  # refresh=False: update() redraws, at most once per mininterval
                self._bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in self._postfix.items()), refresh=False)
            # Several log calls may share a step (e.g. eval after train); never count one twice.
            target = min(int(step) + 1, self._bar.total or int(step) + 1)
            if target > self._bar.n:
                self._bar.update(target - self._bar.n)
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def print(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(str(text))
        else:
            print(text, flush=True)

    def close(self, exit_code: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


class NullLogger:
    """What ranks other than 0 hold: the RunLogger interface, doing nothing."""

    wandb_run_id = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def make_logger(rank: int, **kwargs: Any) -> RunLogger | NullLogger:
    """RunLogger(**kwargs) on rank 0, NullLogger elsewhere."""
    return RunLogger(**kwargs) if rank == 0 else NullLogger()


# ----------------------------------------------------------------------------------------------
# system metrics
# ----------------------------------------------------------------------------------------------
_nvml_ok: bool | None = None  # None: not tried yet; False: failed once, never retried


def _nvml():
    """The initialised pynvml module, or None. A failed init is cached so every step stays cheap."""
    global _nvml_ok
    if _nvml_ok is False:
        return None
    try:
        import pynvml

        if _nvml_ok is None:
            pynvml.nvmlInit()
            _nvml_ok = True
        return pynvml
    except Exception:  # noqa: BLE001 -- no module, no driver, no device: all mean "no GPU metrics"
        _nvml_ok = False
        return None


def _nvml_handle(nvml, index: int):
    """Handle for CUDA device `index`. NVML counts physical devices and ignores
    CUDA_VISIBLE_DEVICES, so map the CUDA index to its physical index (or UUID) first."""
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    entry = visible[index]
    return nvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit() else nvml.nvmlDeviceGetHandleByUUID(entry)


def gpu_metrics(device_index: int | None = None) -> dict[str, float]:
    """Memory, utilisation and power of one CUDA device (None: every visible device), keyed
    `system/gpu{i}/...` with i the CUDA index. {} when pynvml, NVML or a GPU is missing; a metric
    the device does not support (power or utilisation on some MIG slices) is left out."""
    nvml = _nvml()
    if nvml is None:
        return {}

    def query(fn, handle):
        try:
            return fn(handle)
        except nvml.NVMLError:  # NOT_SUPPORTED on this device: leave the metric out
            return None

    out: dict[str, float] = {}
    try:
        visible = [e for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
        indices = [device_index] if device_index is not None else range(len(visible) or nvml.nvmlDeviceGetCount())
        for i in indices:
            handle = _nvml_handle(nvml, i)
            mem = query(nvml.nvmlDeviceGetMemoryInfo, handle)
            util = query(nvml.nvmlDeviceGetUtilizationRates, handle)
            power_mw = query(nvml.nvmlDeviceGetPowerUsage, handle)
            values = {
                "memory_used_gib": None if mem is None else mem.used / GIB,
                "memory_total_gib": None if mem is None else mem.total / GIB,
                "utilization_pct": None if util is None else float(util.gpu),
                "power_w": None if power_mw is None else power_mw / 1000.0,
            }
            out.update({f"system/gpu{i}/{k}": v for k, v in values.items() if v is not None})
    except (nvml.NVMLError, IndexError, ValueError):  # device gone, or index not visible: what we have
        pass
    return out


def process_metrics() -> dict[str, float]:
    """Host RSS of this process and, with CUDA, the peak memory torch's allocator handed out."""
    import psutil

    out = {"system/rss_gib": psutil.Process().memory_info().rss / GIB}
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available():
        out["system/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out
