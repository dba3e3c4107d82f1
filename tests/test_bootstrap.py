"""The paired bootstrap interval for the demo's gain: exact values, by hand and by brute force."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from grpo_fsdp.bootstrap import paired_bootstrap_ci


def _brute_force(before: list[int], after: list[int], level: float) -> tuple[float, float]:
    """Every one of the n^n equally likely resamples of problem indices, exact fractions, inverse-CDF quantiles."""
    n = len(before)
    gains = sorted(Fraction(sum(after[i] - before[i] for i in idx), n)
                   for idx in itertools.product(range(n), repeat=n))
    total = len(gains)

    def quantile(q: Fraction) -> Fraction:
        # the smallest gain g with #(resamples <= g) / total >= q
        for k, g in enumerate(gains, start=1):
            if Fraction(k, total) >= q and (k == total or gains[k] != g):
                return g
        raise AssertionError("unreachable")

    q = Fraction(level).limit_denominator(1000)
    lo, hi = quantile((1 - q) / 2), quantile((1 + q) / 2)
    return float(100 * lo), float(100 * hi)


def test_hand_computed_two_problems():
    # d = [+1, 0]: resample sums 0, 1, 1, 2 of 4 (probabilities 1/4, 1/2, 1/4), gains 0, 50, 100 points.
    # level 0.5: lo = smallest gain with CDF >= 0.25 -> 0 (CDF(0) = 0.25 exactly, a tie);
    #            hi = smallest with CDF >= 0.75 -> 50 (CDF(50) = 0.75 exactly)
    assert paired_bootstrap_ci([0, 0], [1, 0], level=0.5) == (0.0, 50.0)
    assert paired_bootstrap_ci([0, 0], [1, 0]) == (0.0, 100.0)


def test_hand_computed_three_problems():
    # d = [+1, +1, -1]: sum of 3 draws is 3 (8/27), 1 (12/27), -1 (6/27), -3 (1/27); CDF 1/27, 7/27, 19/27, 1.
    # 95%: q = 0.025 < 1/27 -> -100; q = 0.975 -> 100.  90%: q = 0.05 > 1/27 -> -1/3; q = 0.95 -> 100.
    assert paired_bootstrap_ci([0, 0, 1], [1, 1, 0]) == (-100.0, 100.0)
    lo, hi = paired_bootstrap_ci([0, 0, 1], [1, 1, 0], level=0.9)
    assert lo == pytest.approx(-100 / 3, abs=1e-12) and hi == 100.0


@pytest.mark.parametrize("before, after", [
    ([0, 1, 0, 1, 1], [1, 1, 1, 0, 1]),   # d = +1, 0, +1, -1, 0
    ([0, 0, 0, 1], [1, 1, 0, 1]),         # d = +1, +1, 0, 0
    ([1, 0, 1, 0, 0], [1, 1, 1, 1, 0]),   # d = 0, +1, 0, +1, 0
    ([1, 1, 1, 1], [0, 1, 1, 1]),         # a loss: d = -1, 0, 0, 0
])
@pytest.mark.parametrize("level", [0.95, 0.8, 0.5])
def test_equals_brute_force_enumeration(before, after, level):
    lo, hi = paired_bootstrap_ci(before, after, level=level)
    want_lo, want_hi = _brute_force(before, after, level)
    assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)


def test_no_disagreement_is_a_point():
    assert paired_bootstrap_ci([1, 0, 1] * 100, [1, 0, 1] * 100) == (0.0, 0.0)


def test_large_sample_width_matches_the_normal_approximation():
    # 500 problems, 90 gained and 40 lost: gain 10 points, sd of d = sqrt(130/500 - 0.1^2) = 0.5;
    # the normal 95% half-width is 1.96 * 0.5 / sqrt(500) = 4.38 points; the exact bootstrap lands on the 0.2-point grid.
    before = [0] * 90 + [1] * 40 + [0] * 370
    after = [1] * 90 + [0] * 40 + [0] * 370
    lo, hi = paired_bootstrap_ci(before, after)
    assert lo == pytest.approx(10 - 4.38, abs=0.25) and hi == pytest.approx(10 + 4.38, abs=0.25)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="2 and 3 results"):
        paired_bootstrap_ci([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no problems"):
        paired_bootstrap_ci([], [])
