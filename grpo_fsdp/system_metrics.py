"""System metrics: GPU memory, utilisation and power through NVML (pynvml), host RSS, torch peaks.

`rank_metrics(rank, gpu_index)` is what the loggers record each step, one rank's own numbers under
its rank prefix, so that every rank can write into one shared W&B run without clashing:

    system/rank{r}/rss_gib                   host resident memory of this process
    system/rank{r}/cuda_max_allocated_gib    peak memory torch's CUDA allocator handed out (CUDA only)
    system/rank{r}/gpu_memory_used_gib       NVML: memory used on this rank's GPU (every process on it)
    system/rank{r}/gpu_memory_total_gib      NVML: that GPU's memory
    system/rank{r}/gpu_utilization_pct       NVML: percent of the last sample period a kernel ran
    system/rank{r}/gpu_power_w               NVML: board power draw

Without pynvml, without a driver, or on a CPU run, the gpu_* keys are simply absent: no error, and
a failed NVML init is remembered so later steps cost nothing. A value the device does not report
(power or utilisation on some MIG slices) is left out on its own.

`gpu_metrics` and `process_metrics` are the building blocks (and the older public names): they
key by CUDA index (`system/gpu{i}/...`) and without a rank (`system/rss_gib`).
"""

from __future__ import annotations

import os

GIB = float(1 << 30)

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


def _visible_devices() -> list[str]:
    return [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]


def _nvml_handle(nvml, index: int):
    """Handle for CUDA device `index`. NVML counts physical devices and ignores
    CUDA_VISIBLE_DEVICES, so map the CUDA index to its physical index (or UUID) first."""
    visible = _visible_devices()
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    entry = visible[index]
    return nvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit() else nvml.nvmlDeviceGetHandleByUUID(entry)


def gpu_metrics(device_index: int | None = None) -> dict[str, float]:
    """Memory, utilisation and power of one CUDA device (None: every visible device), keyed
    `system/gpu{i}/...` with i the CUDA index. {} when pynvml, NVML or a GPU is missing."""
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
        indices = (
            [device_index] if device_index is not None else range(len(_visible_devices()) or nvml.nvmlDeviceGetCount())
        )
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
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just to read 0
        out["system/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def rank_metrics(rank: int, gpu_index: int | None) -> dict[str, float]:
    """This rank's process metrics and, when it trains on CUDA device `gpu_index`, that GPU's NVML
    metrics, all under `system/rank{rank}/` (layout in the module docstring)."""
    prefix = f"system/rank{rank}/"
    out = {prefix + key.removeprefix("system/"): value for key, value in process_metrics().items()}
    if gpu_index is not None:
        device = f"system/gpu{gpu_index}/"
        out.update({f"{prefix}gpu_{key.removeprefix(device)}": value for key, value in gpu_metrics(gpu_index).items()})
    return out
