"""Issue 11 item 12: Hydra's own flags (--help, --cfg job, -m sweeps) on the compose-API entry point."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL, _env

from grpo_fsdp.cli import compose, redacted_yaml, run_main
from grpo_fsdp.hydra_flags import expand_sweeps, parse_flags
from grpo_fsdp.train import main


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_help_lists_groups_options_and_fields(capsys):
    code, out, err = run(["--help", "algo=grpo"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "  hardware    b200x4, cpu, gpu8gb, h100x2   (now: cpu)" in lines
    assert "  algo        dpo, grpo, sft   (now: grpo)" in lines
    assert any(line.startswith("  experiment  deepseek-r1-distill-1.5b-gpu8gb, deepseek7b-direct-grpo, ") for line in lines)
    # every field with the value this composition gives it, and the schema's comment
    assert "  algo.group_size=8                            # G completions per prompt" in lines
    assert any(line.startswith("  train.max_steps=60 ") and "rollouts (GRPO)" in line for line in lines)
    assert "  optim.lr=0.003" in lines


def test_cfg_job_prints_the_composed_config_redacted(capsys):
    argv = ["optim.lr=1e-5", "data.hub_id=https://alice:s3cr3t-pw@example.invalid/ds"]
    code, out, err = run(["--cfg", "job", *argv], capsys)
    assert code == 0 and err == ""
    assert out == redacted_yaml(compose(argv))
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == 1e-5 and "s3cr3t-pw" not in out


@pytest.mark.parametrize("argv,line", [
    (["--cfg", "hydra"], "error: --cfg: hydra: only the job config exists here (Hydra's own config is not used); use --cfg job"),
    (["--frobnicate"], ("error: overrides: unknown flag '--frobnicate'; the flags are --help, --cfg job, -m/--multirun; "
                        "everything else is key=value")),
])
def test_bad_flags_end_in_one_line(argv, line, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and err.strip() == line


def test_sweeps_expand_like_hydras_basic_sweeper():
    assert expand_sweeps(["optim.lr=1e-5,3e-5", "algo=glob(*,exclude=[sft,dpo])", "train.max_steps=range(1,3)", "+x=[1,2]"]) == [
        ["optim.lr=1e-05", "algo=grpo", "train.max_steps=1", "+x=[1,2]"],
        ["optim.lr=1e-05", "algo=grpo", "train.max_steps=2", "+x=[1,2]"],
        ["optim.lr=3e-05", "algo=grpo", "train.max_steps=1", "+x=[1,2]"],
        ["optim.lr=3e-05", "algo=grpo", "train.max_steps=2", "+x=[1,2]"],
    ]
    assert parse_flags(["-m", "a=1,2", "--cfg=job", "--resolve"]).overrides == ["a=1,2"]


def test_multirun_validates_every_job_before_running_any(capsys, tmp_path):
    code, out, err = run(["-m", "train.global_batch_size=8,30", f"run_dir={tmp_path}/sweep"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"error: train.global_batch_size: 30 is not divisible by micro_batch_size 8 x world size 1 = 8 (multirun job #1 "
        f"of 2: train.global_batch_size=30 run_dir={tmp_path}/sweep/1); use a multiple of 8, e.g. train.global_batch_size=24")
    assert not (tmp_path / "sweep").exists()


def test_multirun_is_refused_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(["-m", "optim.lr=1e-5,3e-5"], capsys)
    assert code == 2 and err.strip().endswith(  # run_main prefixes the rank under torchrun
        "error: --multirun: a sweep runs its jobs one after another in one process, which torchrun cannot do; "
        "launch one torchrun per value, or run the sweep without torchrun")


def test_multirun_runs_each_job_in_its_own_run_dir(tmp_path):
    over = [*SMALL, "data.arithmetic.num_train=64", "train.max_steps=1", "optim.warmup_steps=0", f"run_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.train", "-m", "optim.lr=1e-3,3e-3", *over], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[multirun] 2 jobs, run dirs under {tmp_path}" in proc.stdout
    assert "[multirun] all 2 jobs done" in proc.stdout
    lrs = [yaml.safe_load((tmp_path / n / "config.yaml").read_text())["optim"]["lr"] for n in ("0", "1")]
    assert lrs == [1e-3, 3e-3]
    assert all((tmp_path / n / "metrics.jsonl").read_text().count("\n") == 1 for n in ("0", "1"))


def test_a_preempted_job_ends_the_sweep(capsys, tmp_path, monkeypatch):
    """A job that saved on SIGTERM writes the preemption marker (preemption.Preemption.saved) and returns 0:
    the sweep stops there, and the job saw only its own overrides in sys.argv (its resume command)."""
    import os

    from grpo_fsdp.hydra_flags import PREEMPT_MARKER_ENV, multirun

    monkeypatch.delenv(PREEMPT_MARKER_ENV, raising=False)
    seen = []

    def fake_main(job):
        seen.append(sys.argv[1:])
        Path(os.environ[PREEMPT_MARKER_ENV]).write_text("1\tckpt\tcmd\n")
        return 0

    assert multirun(["optim.lr=1e-3,2e-3,3e-3", f"run_dir={tmp_path}"], fake_main) == 0
    assert seen == [["optim.lr=0.001", f"run_dir={tmp_path}/0"]]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "[multirun] #0 was preempted (SIGTERM) and saved its checkpoint; #1-#2 did not run")
    assert PREEMPT_MARKER_ENV not in os.environ
