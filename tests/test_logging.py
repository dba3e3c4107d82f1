"""Tests for grpo_fsdp.logging: metrics.jsonl contents and resume, key namespacing, config.yaml,
W&B offline runs that resume under one id, eval rows, the per-rank system metrics (with a fake NVML
and without one), and what a non-zero rank's logger does alone. The two-rank shared run is in
test_shared_wandb.py."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from grpo_fsdp import logging as runlog
from grpo_fsdp import system_metrics
from grpo_fsdp.config import LoggingConfig

CONFIG_YAML = "model:\n  name: tiny\ntrain:\n  max_steps: 10\n  lr: 0.001\n"


def _read(path, keep_system=False):
    """metrics.jsonl rows; without the system/rank0/ keys every rank's log call adds, unless asked."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows if keep_system else [{k: v for k, v in r.items() if not k.startswith("system/rank0/")} for r in rows]


def _logger(run_dir, start_step=0, **cfg):
    cfg.setdefault("progress_bar", True)
    return runlog.RunLogger(
        run_dir, LoggingConfig(**cfg), CONFIG_YAML, total_steps=10, run_name="test", world_size=2, start_step=start_step
    )


def test_metrics_jsonl_holds_logged_dicts_in_order(tmp_path):
    logged = [
        (0, {"train/loss": 2.5, "train/lr": 1e-4, "perf/tokens_per_s": 1234.5}),
        (1, {"train/loss": 1.25, "reward/mean": 0.1 + 0.2, "rollout/len": 17}),
        (1, {"eval/gsm8k/accuracy": 0.375}),  # a second call at the same step is its own line
        (2, {"system/rss_gib": 3.0 / 7.0}),
    ]
    with _logger(tmp_path / "run") as lg:
        for step, metrics in logged:
            lg.log(step, metrics)
        lg.print("a line that must not break the bar")
    rows = _read(tmp_path / "run" / "metrics.jsonl")
    assert rows == [{"step": s, **m} for s, m in logged]  # exact float round-trip


def test_tensor_values_and_non_finite(tmp_path):
    torch = pytest.importorskip("torch")
    with _logger(tmp_path, progress_bar=False) as lg:
        lg.log(0, {"train/loss": torch.tensor(0.5), "train/grad_norm": float("nan"), "perf/x": math.inf})
    (row,) = _read(tmp_path / "metrics.jsonl")
    # NaN/inf are written as null so the file stays standard JSON.
    assert row == {"step": 0, "train/loss": 0.5, "train/grad_norm": None, "perf/x": None}
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_resume_truncates_later_steps(tmp_path):
    with _logger(tmp_path) as lg:
        for step in range(5):
            lg.log(step, {"train/loss": float(step)})
    # A torn last line, as a crash mid-write would leave.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')

    with _logger(tmp_path, start_step=2) as lg:  # steps 0..2 are in the checkpoint
        lg.log(3, {"train/loss": 30.0})
        lg.log(4, {"train/loss": 40.0})
    rows = _read(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_without_later_steps_leaves_file_alone(tmp_path):
    with _logger(tmp_path) as lg:
        lg.log(0, {"train/loss": 1.0})
    with _logger(tmp_path, start_step=0) as lg:
        lg.log(1, {"train/loss": 2.0})
    assert [r["step"] for r in _read(tmp_path / "metrics.jsonl")] == [0, 1]


@pytest.mark.parametrize("key", ["loss", "step", "training/loss", "train/", "Train/loss"])
def test_non_namespaced_key_raises(tmp_path, key):
    with _logger(tmp_path, progress_bar=False) as lg, pytest.raises(ValueError, match="namespaced"):
        lg.log(0, {"train/loss": 1.0, key: 1.0})
    # Nothing is written for a rejected call.
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_config_yaml_written(tmp_path):
    with _logger(tmp_path / "a" / "b"):
        pass
    assert (tmp_path / "a" / "b" / "config.yaml").read_text() == CONFIG_YAML


def test_wandb_offline_run_resumes_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"

    with _logger(run_dir, wandb=True) as lg:
        first_id = lg.wandb_run_id
        lg.log(0, {"train/loss": 1.0})
        lg.log(1, {"train/loss": 0.5})
    assert first_id and (run_dir / "wandb_id.txt").read_text().strip() == first_id
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{first_id}*"))
    assert len(runs) == 1
    assert (runs[0] / f"run-{first_id}.wandb").is_file()

    with _logger(run_dir, start_step=2, wandb=True) as lg:
        assert lg.wandb_run_id == first_id
        lg.log(2, {"train/loss": 0.25})
    # Offline mode writes a second directory for the resumed run, under the same id
    # (`wandb sync` later appends both to one run).
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{first_id}*"))
    assert len(runs) == 2
    assert all((r / f"run-{first_id}.wandb").is_file() for r in runs)
    assert [r["step"] for r in _read(run_dir / "metrics.jsonl")] == [0, 1, 2]


def test_gpu_metrics_empty_without_gpu(monkeypatch):
    monkeypatch.setattr(system_metrics, "_nvml_ok", None)  # re-run the init whatever earlier tests did
    if system_metrics._nvml() is not None:
        pytest.skip("NVML and a GPU are available on this machine")
    monkeypatch.setattr(system_metrics, "_nvml_ok", None)
    assert runlog.gpu_metrics(None) == {}
    assert system_metrics._nvml_ok is False  # the failure is cached ...
    assert runlog.gpu_metrics(0) == {}  # ... and later calls stay quiet and cheap


def test_rank_metrics_without_pynvml(monkeypatch):
    """No pynvml module at all (a CPU install): no GPU keys, no error, process metrics still there."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    monkeypatch.setattr(system_metrics, "_nvml_ok", None)
    m = runlog.rank_metrics(3, 0)
    assert not any("gpu" in k for k in m)
    assert m["system/rank3/rss_gib"] > 0 and all(k.startswith("system/rank3/") for k in m)
    assert system_metrics._nvml_ok is False


class FakeNVML(types.ModuleType):
    """pynvml for 4 GPUs: device h uses (h+1) GiB of 80 GiB, runs at 50+h % and draws 300 W
    (reported in milliwatts); device 1 cannot report power, as on some MIG slices."""

    NVMLError = type("NVMLError", (Exception,), {})

    def __init__(self):
        super().__init__("pynvml")
        self.queried = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        self.queried.append(i)
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("NVML_ERROR_NOT_SUPPORTED")
        return 300_000  # milliwatts


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(system_metrics, "_nvml_ok", None)
    return nvml


def test_gpu_metrics_with_fake_nvml(fake_nvml, monkeypatch):
    """Units, key names and the CUDA_VISIBLE_DEVICES -> NVML index mapping, without a GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert runlog.gpu_metrics(0) == {
        "system/gpu0/memory_used_gib": 4.0,
        "system/gpu0/memory_total_gib": 80.0,
        "system/gpu0/utilization_pct": 53.0,
        "system/gpu0/power_w": 300.0,
    }
    m = runlog.gpu_metrics(None)
    assert fake_nvml.queried == [3, 3, 1]  # CUDA index 1 is physical GPU 1 here; 0 is physical 3
    assert m["system/gpu1/memory_used_gib"] == 2.0 and "system/gpu1/power_w" not in m


def test_rank_metrics_with_fake_nvml(fake_nvml, monkeypatch):
    """Rank 1 trains on CUDA device 1, which CUDA_VISIBLE_DEVICES=2,0 maps to physical GPU 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    m = runlog.rank_metrics(1, 1)
    gpu = {k: v for k, v in m.items() if "/gpu_" in k}
    assert gpu == {
        "system/rank1/gpu_memory_used_gib": 1.0,  # (0 + 1) * 2**30 bytes
        "system/rank1/gpu_memory_total_gib": 80.0,  # 80 * 2**30 bytes
        "system/rank1/gpu_utilization_pct": 50.0,
        "system/rank1/gpu_power_w": 300.0,  # 300_000 mW
    }
    assert fake_nvml.queried == [0]
    assert m["system/rank1/rss_gib"] > 0
    # Physical GPU 1 has no power reading: that key alone is missing. A CPU rank has no GPU keys.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert "system/rank0/gpu_power_w" not in runlog.rank_metrics(0, 0)
    assert runlog.rank_metrics(0, 0)["system/rank0/gpu_memory_used_gib"] == 2.0
    assert not any("gpu" in k for k in runlog.rank_metrics(0, None))


def test_log_adds_this_ranks_system_metrics(tmp_path, fake_nvml, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with runlog.RunLogger(tmp_path, LoggingConfig(progress_bar=False), "", 10, "t", 1, gpu_index=2) as lg:
        lg.log(1, {"train/loss": 1.0})
    (row,) = _read(tmp_path / "metrics.jsonl", keep_system=True)
    assert row["system/rank0/gpu_memory_used_gib"] == 3.0 and row["system/rank0/gpu_power_w"] == 300.0
    assert row["system/rank0/rss_gib"] > 0


def test_process_metrics():
    m = runlog.process_metrics()
    assert m["system/rss_gib"] > 0
    assert all(k.startswith("system/") for k in m)


def test_log_eval_writes_its_own_line(tmp_path):
    with _logger(tmp_path, progress_bar=False) as lg:
        lg.log(2, {"train/loss": 0.5})
        lg.log_eval(2, {"eval/gsm8k/accuracy": 0.25})
        with pytest.raises(ValueError, match="only eval/"):
            lg.log_eval(2, {"train/loss": 0.5})
    assert _read(tmp_path / "metrics.jsonl") == [
        {"step": 2, "train/loss": 0.5},
        {"step": 2, "eval/gsm8k/accuracy": 0.25},
    ]


def test_other_rank_alone_writes_nothing(tmp_path, capsys):
    """Without a process group (and without W&B) a rank-1 logger validates keys and keeps nothing."""
    lg = runlog.make_logger(
        1,
        run_dir=tmp_path / "never",
        cfg=LoggingConfig(wandb=True),
        config_yaml="",
        total_steps=1,
        run_name="x",
        world_size=2,
    )
    assert isinstance(lg, runlog.RankLogger) and lg.wandb_run_id is None
    with lg:
        lg.log(1, {"train/loss": 1.0, "eval/x/accuracy": 0.5})
        lg.log_eval(1, {"eval/x/accuracy": 0.5})
        lg.print("hidden")
        with pytest.raises(ValueError, match="namespaced"):
            lg.log(2, {"not namespaced": 1.0})  # every rank checks keys, before any collective
    lg.close()
    assert not (tmp_path / "never").exists()
    assert capsys.readouterr().out == ""


def test_null_logger_is_a_no_op(capsys):
    with runlog.NullLogger() as lg:
        lg.log(0, {"not namespaced": 1.0})
        lg.log_eval(0, {"eval/x": 1.0})
        lg.print("hidden")
    assert capsys.readouterr().out == ""


def test_make_logger_rank0(tmp_path):
    lg = runlog.make_logger(
        0,
        run_dir=tmp_path,
        cfg=LoggingConfig(progress_bar=False),
        config_yaml="a: 1\n",
        total_steps=1,
        run_name="x",
        world_size=1,
    )
    assert isinstance(lg, runlog.RunLogger)
    lg.close()
    lg.close()  # idempotent
