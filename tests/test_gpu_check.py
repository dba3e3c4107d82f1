"""Issue 17 item 5: benchmarks/gpu_check.sh cannot rot. Its --dry-run (no GPU, no Python started) prints every
line and checks that each script and --flag it names exists and that the timeouts fit the 8.5-minute budget; a
tree with a flag or a script removed fails it; a real run with a stand-in interpreter writes its logs and
summary under GPU_CHECK_OUT."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
LINES = ("pytest-gpu", "train-throughput-mfu", "grpo-step", "rollout", "prefix-attention", "qlora-memory", "pytest-flex",
         "prefix-attention-flex")  # in run order: the lines that hung on the first GPU run come last
PYTEST_LINES = ("pytest-gpu", "pytest-flex")
QLORA = REPO / "benchmarks" / "qlora_memory.py"


def check(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


def test_dry_run_names_existing_scripts_and_flags():
    proc = check(REPO, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in LINES:
        if name != "qlora-memory":
            assert f"RUN  {name} (timeout " in out, name
    assert "-m pytest -m gpu" in out and "--model qwen2.5-1.5b" in out
    assert ("RUN  qlora-memory" if QLORA.exists() else "SKIP qlora-memory: benchmarks/qlora_memory.py is not built yet") in out
    assert "timeouts add up to 510s of a 510s budget" in out
    assert out.rstrip().endswith("dry run: every script and flag exists")


def copy_tree(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copytree(REPO / "benchmarks", repo / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", repo)
    shutil.copy(REPO / "tests" / "test_gpu.py", repo / "tests")
    return repo


def test_dry_run_fails_on_a_missing_flag_or_script(tmp_path):
    repo = copy_tree(tmp_path)
    assert check(repo, "--dry-run").returncode == 0
    bench = repo / "benchmarks" / "train_throughput.py"
    bench.write_text(bench.read_text().replace('"--seq-len"', '"--sequence-length"'))
    (repo / "benchmarks" / "grpo_step.py").unlink()
    proc = check(repo, "--dry-run")
    assert proc.returncode == 1
    assert "train-throughput-mfu: benchmarks/train_throughput.py defines no --seq-len" in proc.stdout
    assert "grpo-step: benchmarks/grpo_step.py does not exist" in proc.stdout
    assert "dry run: 2 problem(s)" in proc.stdout


def test_a_run_writes_every_log_and_the_summary_under_one_folder(tmp_path):
    out = tmp_path / "gpu"
    env = {"GPU_CHECK_OUT": str(out), "PYTHON": "echo", "GPU_CHECK_TOKENIZER": str(tmp_path)}  # lines echo their command
    proc = check(REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split("\t") for ln in (out / "summary.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == list(LINES)
    for name, status, _ in rows:
        if name == "qlora-memory" and not QLORA.exists():
            assert status == "skipped: benchmarks/qlora_memory.py not built yet"
            continue
        assert status == "ok", name
        assert f"--out {out}" in (out / f"{name}.log").read_text() or name in PYTEST_LINES
    for name in PYTEST_LINES:
        assert f"--junitxml={out}/{name}.xml" in (out / f"{name}.log").read_text()
    assert (out / "env.txt").exists()


def test_only_reruns_the_named_lines_and_appends_to_the_summary(tmp_path):
    out = tmp_path / "gpu"
    env = {"GPU_CHECK_OUT": str(out), "PYTHON": "echo", "GPU_CHECK_TOKENIZER": str(tmp_path)}
    assert check(REPO, env=env).returncode == 0
    (out / "rollout.log").unlink()
    proc = check(REPO, "--only", "rollout,pytest-flex", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split("\t")[0] for ln in (out / "summary.tsv").read_text().splitlines()[1:]]
    assert rows == [*LINES, "rollout", "pytest-flex"]
    assert (out / "rollout.log").exists()
