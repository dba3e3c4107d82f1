"""Learning-rate multipliers against values worked out by hand."""

import pytest

from grpo_fsdp.schedule import lr_multiplier


def test_warmup_then_cosine_to_floor():
    # warmup 2 of 12 steps: 1/2, 2/2; decay over steps 2..11 (9 intervals), floor 0.1
    f = [lr_multiplier(s, 2, 12, "cosine", 0.1) for s in range(12)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert f[11] == pytest.approx(0.1, abs=1e-12)
    # step 5: t = 3/9, cos(pi/3) = 0.5 -> shape 0.75 -> 0.1 + 0.9 * 0.75 = 0.775
    assert f[5] == pytest.approx(0.775, abs=1e-12)
    assert f[2:] == sorted(f[2:], reverse=True)

def test_linear_and_constant():
    # linear, no warmup, 11 steps, floor 0: step 5 is halfway -> 0.5
    assert lr_multiplier(5, 0, 11, "linear", 0.0) == pytest.approx(0.5, abs=1e-12)
    assert lr_multiplier(10, 0, 11, "linear", 0.0) == 0.0
    assert lr_multiplier(7, 3, 10, "constant", 0.1) == 1.0
    assert lr_multiplier(0, 0, 1, "cosine", 0.2) == 1.0  # t = 0: the top of the curve
