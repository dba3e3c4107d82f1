"""The declared Python floor holds: `requires-python` in pyproject.toml (3.10, what the Docker image's
Ubuntu 22.04 runs) is met by every module, checked statically by vermin (a dev dependency) so that a
3.11-only name such as `typing.Self` fails here rather than in the image. ruff's target agrees."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

SOURCES = ("grpo_fsdp", "eval", "benchmarks", "tests")


def _floor() -> str:
    # a regex, not tomllib: tomllib is itself 3.11+, and this test must run on the floor too
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^requires-python\s*=\s*">=\s*(\d+\.\d+)"', text, re.MULTILINE)
    assert match, "pyproject.toml: requires-python should read \">=X.Y\""
    return match[1]


def test_every_module_runs_on_the_declared_floor():
    pytest.importorskip("vermin", reason="vermin comes with the dev extra: pip install -e '.[dev]'")
    floor = _floor()
    run_vermin = "import sys; from vermin import main; sys.exit(main())"  # the package has no __main__
    proc = subprocess.run([sys.executable, "-c", run_vermin, "--no-tips", "--violations", f"-t={floor}-", *SOURCES],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    violations = [line for line in proc.stdout.splitlines() if "requires" in line]
    assert proc.returncode == 0 and not violations, f"needs more than Python {floor}:\n{proc.stdout}{proc.stderr}"


def test_ruff_targets_the_floor():
    target = re.search(r'^target-version\s*=\s*"py(\d)(\d+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert target and f"{target[1]}.{target[2]}" == _floor()
