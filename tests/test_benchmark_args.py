"""The side-by-side benchmarks refuse settings they cannot report, in one line, before building anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("module", ["grpo_vs_trl", "dpo_vs_trl"])
def test_one_step_is_refused_the_steady_window_needs_two(module, capsys):
    bench = __import__(module)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: --steps 1: needs at least 2 (the steady figures time steps 2..N)")
    assert bench.parse_args(["--steps", "2"]).steps == 2
