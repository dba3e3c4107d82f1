"""Run logging: console progress bar, `<run_dir>/metrics.jsonl`, one W&B run shared by every rank,
and each rank's system metrics.

Every rank holds a logger from `make_logger`, which every rank calls together: rank 0 gets a
`RunLogger` (progress bar, config.yaml, metrics.jsonl, its W&B writer), every other rank a
`RankLogger` (its W&B writer, nothing on disk). The loop makes the same calls on every rank and
never tests the rank (DESIGN.md):

    logger.log(step, metrics)       # every rank, once per optimizer step: a collective, like all_reduce
    logger.log_eval(step, results)  # the eval rank, after evaluating at `step`: local, never waits
    logger.print(text)              # a console line; rank 0 prints it
    logger.close()                  # every rank at the end; a collective on a clean exit

What `log` records: rank 0 every key of `metrics`; rank r only the `eval/` keys among them (the rest
are rank 0's to log; in the recipes they are global values that every rank computed). Each rank adds
its own system metrics under `system/rank{r}/` (system_metrics.py); the recipes pass none.

W&B: each rank logs its own keys into the one run itself (wandb_run.py: shared mode online, one file
per rank under one id offline; the x-axis is `train/step`).

metrics.jsonl stays rank 0's file, one line per log call. Other ranks' rows reach it through the next
`log` (a `gather_object` to rank 0 of a few hundred bytes): that step's line carries every rank's
`system/rank{r}/` keys, and eval results that rank r logged at step k are written, when step k+1
(or `close`) gathers them, as their own line `{"step": k, "eval/...": ...}` just before step k+1's
line. Why not a file per rank: readers want one file per run, and appends from several processes
(several nodes, over NFS) to one file are not safe. What it costs: `log` and `close` are collectives,
so every rank must call them equally often; a rank that skips one leaves the others waiting.

Step convention: `step` counts optimizer steps completed (the first logged step is 1, as in
checkpoint names `step_000001`). A run resumed after N completed steps passes `start_step=N`: its
bar starts at N and metrics.jsonl loses lines past step N (metrics_file.py, which also holds the
rules for keys and values, checked on every rank before any collective).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpo_fsdp import wandb_run
from grpo_fsdp.config import LoggingConfig
from grpo_fsdp.metrics_file import NAMESPACES, MetricsFile, atomic_write, validated  # noqa: F401 -- NAMESPACES is public
from grpo_fsdp.system_metrics import GIB, gpu_metrics, process_metrics, rank_metrics  # noqa: F401 -- public names

# Keys shown in the progress-bar postfix: (metric key, label, format).
_POSTFIX = (("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"), ("perf/tokens_per_s", "tok/s", "{:.0f}"))


def _gather_to_rank0(payload: dict) -> list[dict]:
    """Every rank's payload on rank 0, in rank order ([] elsewhere); just [payload] without a
    process group of more than one rank (single process, unit tests)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [payload]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, out, dst=0)
    return out or []


class _Logger:
    """What every rank's logger shares: the rank, its GPU, its W&B writer, the context manager."""

    def __init__(self, rank: int, gpu_index: int | None):
        self.rank = rank
        self.gpu_index = gpu_index
        self.wandb_run_id: str | None = None
        self._wandb: wandb_run.WandbWriter | None = None
        self._closed = False

    def _open_wandb(self, run_dir: Path, cfg: LoggingConfig, config_yaml: str, name: str, world_size: int, run_id: str):
        self._wandb = wandb_run.open_run(rank=self.rank, world_size=world_size, run_id=run_id, run_dir=run_dir, cfg=cfg,
                                         config_yaml=config_yaml, name=name)  # fmt: skip
        self.wandb_run_id = self._wandb.id

    def _to_wandb(self, step: int, values: dict[str, int | float]) -> None:
        if self._wandb is not None and values:
            self._wandb.log(step, values)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. evaluation samples) into the shared W&B run at training step `step`; a no-op
        without W&B (metrics.jsonl holds scalars only)."""
        if self._wandb is not None and rows:
            import wandb

            self._wandb.log(step, {key: wandb.Table(columns=columns, data=rows)})

    def _finish_wandb(self, exit_code: int) -> None:
        if self._wandb is not None:
            self._wandb.finish(exit_code)
            self._wandb = None

    def close(self, exit_code: int = 0) -> None:
        """Collective on a clean exit (the last eval rows reach rank 0); local after an error."""
        if self._closed:
            return
        self._closed = True
        try:
            if exit_code == 0:
                self._hand_over_last()
        finally:
            self._release()
            self._finish_wandb(exit_code)

    def _hand_over_last(self) -> None:
        """The closing collective: eval rows still pending go to rank 0."""

    def _release(self) -> None:
        """Local resources of this rank's logger (bar, files)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


class RunLogger(_Logger):
    """Rank 0: metrics.jsonl (append), tqdm bar on stderr, config.yaml, its W&B writer (the run's creator)."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        config_yaml: str,
        total_steps: int,
        run_name: str,
        world_size: int,
        start_step: int = 0,
        gpu_index: int | None = None,
    ):
        super().__init__(0, gpu_index)
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.world_size = world_size
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / "config.yaml", config_yaml)

        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._file = MetricsFile(self.metrics_path, start_step)
        self._postfix: dict[str, str] = {}

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
        if cfg.wandb:
            try:
                self._open_wandb(
                    self.run_dir, cfg, config_yaml, run_name, world_size, wandb_run.read_or_create_run_id(self.run_dir)
                )
            except BaseException:
                self.close(exit_code=1)  # do not leave the bar drawn and the file open
                raise

    # ------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Collective. Write `{"step": step, **metrics, **every rank's system metrics}` (after any
        eval lines the other ranks hand over), refresh the bar, and send rank 0's part to W&B."""
        values = {**validated(metrics), **rank_metrics(0, self.gpu_index)}
        others = _gather_to_rank0({})[1:]
        self._write_handed_over(others)
        row = dict(values)
        for payload in others:
            row.update(payload["values"])
        self._file.write(step, row)
        self._advance_bar(step, values)
        self._to_wandb(step, values)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation results for training step `step` (world size 1, or rank 0 evaluating)."""
        values = validated(metrics, only="eval/")
        self._file.write(step, values)
        self._to_wandb(step, values)

    def _write_handed_over(self, payloads: list[dict]) -> None:
        for payload in payloads:
            for step, values in payload["eval"]:
                self._file.write(step, values)

    def _advance_bar(self, step: int, values: dict[str, int | float]) -> None:
        if self._bar is None:
            return
        for key, label, fmt in _POSTFIX:
            if key in values:
                self._postfix[label] = fmt.format(values[key])
        if self._postfix:  # refresh=False: update() redraws, at most once per mininterval
            self._bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in self._postfix.items()), refresh=False)
        # Several log calls may share a step (e.g. eval after train); never count one twice.
        target = min(int(step) + 1, self._bar.total or int(step) + 1)
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)

    def print(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(str(text))
        else:
            print(text, flush=True)

    def _hand_over_last(self) -> None:
        self._write_handed_over(_gather_to_rank0({})[1:])

    def _release(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()


class RankLogger(_Logger):
    """Ranks other than 0: their system metrics and eval results, into the shared W&B run and, via
    rank 0 at the next collective, into metrics.jsonl. Writes nothing to disk itself."""

    def __init__(
        self,
        rank: int,
        run_dir: str | Path,
        cfg: LoggingConfig,
        config_yaml: str,
        run_name: str,
        world_size: int,
        wandb_run_id: str | None = None,
        gpu_index: int | None = None,
    ):
        super().__init__(rank, gpu_index)
        self._pending: list[tuple[int, dict[str, int | float]]] = []  # eval rows not yet handed to rank 0
        if cfg.wandb and wandb_run_id:
            self._open_wandb(Path(run_dir), cfg, config_yaml, run_name, world_size, wandb_run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Collective. Records this rank's `eval/` keys of `metrics` and its system metrics."""
        values = {k: v for k, v in validated(metrics).items() if k.startswith("eval/")}
        values.update(rank_metrics(self.rank, self.gpu_index))
        _gather_to_rank0({"values": values, "eval": self._pending})
        self._pending = []
        self._to_wandb(step, values)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation results for training step `step`: to W&B now, to metrics.jsonl at the next `log`."""
        values = validated(metrics, only="eval/")
        self._pending.append((int(step), values))
        self._to_wandb(step, values)

    def print(self, text: str) -> None:
        pass

    def _hand_over_last(self) -> None:
        _gather_to_rank0({"values": {}, "eval": self._pending})
        self._pending = []


class NullLogger:
    """The logger interface doing nothing (tools and tests; ranks get a RankLogger from make_logger)."""

    wandb_run_id = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def make_logger(
    rank: int,
    *,
    run_dir: str | Path,
    cfg: LoggingConfig,
    config_yaml: str,
    total_steps: int,
    run_name: str,
    world_size: int,
    start_step: int = 0,
    device=None,
) -> RunLogger | RankLogger:
    """Every rank calls this together. Rank 0 builds its RunLogger (creating or resuming the W&B run)
    and then broadcasts the run id; the other ranks receive it and join the run. `device`, this rank's
    torch device, says which GPU's NVML metrics to record (none for a CPU device or None)."""
    gpu_index = (device.index or 0) if device is not None and device.type == "cuda" else None
    share_id = cfg.wandb and world_size > 1 and _group_size() > 1
    if rank == 0:
        try:
            logger = RunLogger(run_dir, cfg, config_yaml, total_steps, run_name, world_size, start_step, gpu_index)
        except BaseException:
            if share_id:  # the other ranks stop with a clear error instead of waiting for an id
                _broadcast(None)
            raise
        if share_id:
            _broadcast(logger.wandb_run_id)
        return logger
    run_id = _broadcast(None) if share_id else None
    if share_id and run_id is None:
        raise RuntimeError(f"rank {rank}: rank 0 could not open the W&B run (its error says why)")
    return RankLogger(rank, run_dir, cfg, config_yaml, run_name, world_size, run_id, gpu_index)


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast(obj):
    from grpo_fsdp.distributed import broadcast_object

    return broadcast_object(obj)
