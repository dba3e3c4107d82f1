"""Rewards: math-verify grading on real gold answers, equivalent forms, adversarial completions
under the wall-clock timeout (worker killed and replaced), the format reward, DAPO's overlong
penalty by hand, and the constant-reward watch."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from grpo_fsdp.data.gsm8k import gsm8k_gold
from grpo_fsdp.rewards import (
    ConstantRewardWatch,
    RewardScorer,
    RewardWeights,
    format_ok,
    grade,
    overlong_penalty,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TIMEOUT_S = 2.5


def _rows(relative: str, n: int) -> list[dict]:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data sets sit beside the project checkout)")
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _wrong(golds: list[str], i: int) -> str:
    """gold + 1 for an integer; otherwise the next row's (different) answer."""
    if re.fullmatch(r"-?\d+", golds[i]):
        return str(int(golds[i]) + 1)
    return golds[(i + 1) % len(golds)]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(num_workers=2, timeout_s=TIMEOUT_S) as s:
        yield s


def _score(scorer, completions, golds):
    return scorer.score(completions, golds, [10] * len(completions), max_length=100)


@pytest.mark.parametrize("source", ["gsm8k", "math500"])
def test_real_gold_answers(scorer, source):
    if source == "gsm8k":
        golds = [gsm8k_gold(r["answer"]) for r in _rows("gsm8k/test.jsonl", 20)]
    else:
        golds = [r["answer"] for r in _rows("math/math500.jsonl", 20)]
    right = [f"Let me work it out step by step. The answer is \\boxed{{{g}}}." for g in golds]
    wrong = [f"Let me work it out step by step. The answer is \\boxed{{{_wrong(golds, i)}}}." for i in range(20)]
    result = _score(scorer, right + wrong, golds + golds)
    assert result.rewards == [1.0] * 20 + [0.0] * 20, [(g, r) for g, r in zip(golds * 2, result.rewards)]
    assert (result.timeouts, result.parse_failures) == (0, 0)


EQUIVALENT = [  # (gold, what the model boxed)
    ("\\frac12", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("18", "\\$18.00"),
    ("18", "18.00"),
    ("1/2", "\\dfrac{1}{2}"),
    ("\\dfrac{1}{2}", "1/2"),
    ("1000", "1,000"),
    ("1,000", "1000"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("\\text{(C)}", "C"),
]


@pytest.mark.parametrize(("gold", "boxed"), EQUIVALENT)
def test_equivalent_forms_in_process(gold, boxed):
    assert grade(f"So the answer is $\\boxed{{{boxed}}}$.", gold) == 1.0


def test_equivalent_wrong_and_missing_answers_in_pool(scorer):
    completions = [f"Thus \\boxed{{{b}}}." for _, b in EQUIVALENT] + [
        "The answer is \\boxed{73}.",  # wrong
        "The final answer is $72$.",  # no box: an anchored answer is still graded
        "I think it is 3 plus 4, so 72 maybe",  # no box, no anchor: no answer
        "Earlier \\boxed{72}, and finally \\boxed{7",  # last box cut off: not the earlier box
    ]
    golds = [g for g, _ in EQUIVALENT] + ["72"] * 4
    result = _score(scorer, completions, golds)
    assert result.correct == [True] * len(EQUIVALENT) + [False, True, False, False]
    assert result.parse_failures == 2 and result.timeouts == 0


def test_adversarial_completions_finish_within_timeout(scorer):
    adversarial = {
        "nested": "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
        "huge": "The answer is \\boxed{10^{100000}}.",
        "tower": "The answer is \\boxed{9^{9^{9^{9}}}}.",
        "megabyte": "blah " * 200_000,
        "megabyte_box": "\\boxed{" + "1+" * 500_000 + "1}",
    }
    start = time.monotonic()
    result = _score(scorer, list(adversarial.values()), ["5"] * len(adversarial))
    elapsed = time.monotonic() - start
    status = dict(zip(adversarial, result.statuses))
    assert result.rewards == [0.0] * len(adversarial)
    assert status["tower"] == "timeout"  # sympy would compute 9^(9^387420489)
    assert status["megabyte"] == "no_answer"
    assert status["huge"] in ("ok", "timeout")  # a big integer, not equal to 5
    assert result.timeouts == result.statuses.count("timeout") >= 1
    assert result.parse_failures == result.statuses.count("no_answer") + result.statuses.count("error") >= 1
    # Two workers, each sample bounded by the timeout (plus a replacement's start-up).
    assert elapsed < 3 * TIMEOUT_S + 10, elapsed
    # The pool still grades correctly afterwards, with replaced workers.
    assert _score(scorer, ["\\boxed{5}", "\\boxed{6}"] * 4, ["5"] * 8).rewards == [1.0, 0.0] * 4


def test_timed_out_worker_is_killed_and_replaced():
    with RewardScorer(num_workers=1, timeout_s=1.5) as scorer:
        assert _score(scorer, ["\\boxed{1}"], ["1"]).rewards == [1.0]  # wait for start-up
        pid = scorer._workers[0].proc.pid
        result = _score(
            scorer, ["\\boxed{9^{9^{9^{9}}}}", "x = \\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["5", "0.5", "3"]
        )
        assert result.statuses[0] == "timeout" and result.timeouts == 1
        assert result.rewards == [0.0, 1.0, 1.0]
        assert scorer._workers[0].proc.pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped


def test_worker_that_died_while_idle_is_replaced(scorer):
    scorer.wait_ready()  # idle = ready and waiting: a worker dying before it is ready is a startup failure
    _score(scorer, ["\\boxed{1}"], ["1"])
    victim = scorer._workers[0].proc
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=5)
    result = _score(scorer, ["\\boxed{2}", "\\boxed{3}", "\\boxed{4}"], ["2", "3", "5"])
    assert result.rewards == [1.0, 1.0, 0.0] and result.parse_failures == 0


def test_format_ok():
    assert format_ok("Work... The answer is $\\boxed{42}$.")
    assert not format_ok("no box here, 42")
    assert not format_ok("\\boxed{1} and then \\boxed{2}")  # more than one final answer
    assert not format_ok("The answer is \\boxed{42")  # never closes
    assert not format_ok("The answer is \\boxed{}.")
    assert not format_ok("\\boxed{42} " + "and then rambling on " * 10)


def test_overlong_penalty_by_hand():
    # Lmax = 100, Lc = 20: zero up to 80, linear to -1 at 100, -1 beyond.
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == (80 - 90) / 20 == -0.5
    assert overlong_penalty(100, 100, 20) == -1.0
    assert overlong_penalty(101, 100, 20) == -1.0
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0


def test_weighted_sum():
    weights = RewardWeights(correct=1.0, format=0.5, overlong_penalty=1.0, overlong_buffer=20)
    with RewardScorer(weights, num_workers=1, timeout_s=TIMEOUT_S) as s:
        done = "The answer is \\boxed{7}."
        result = s.score([done, done, "\\boxed{8}"], ["7", "7", "7"], lengths=[90, 100, 50], max_length=100)
    # correct + format - overlong: 1 + 0.5 - 0.5; truncated (no format) 1 + 0 - 1; wrong 0 + 0.5 - 0
    assert result.rewards == [1.0, 0.0, 0.5]
    assert result.formatted == [True, False, True]


def test_score_refuses_mismatched_lists_and_fork(scorer):
    with pytest.raises(ValueError, match="must match"):
        scorer.score(["a", "b"], ["1"], [1, 2], 10)
    with pytest.raises(ValueError, match="fork"):
        RewardScorer(start_method="fork")
    closed = RewardScorer(num_workers=1)
    closed.close()
    with pytest.raises(RuntimeError, match="after close"):
        closed.score(["\\boxed{1}"], ["1"], [1], 10)


def test_constant_reward_watch_triggers_at_k():
    watch = ConstantRewardWatch(3)
    assert watch.update([0.0, 0.0]) is None
    assert watch.update([0.0, 0.0]) is None
    message = watch.update([0.0, 0.0])
    assert message is not None and "all 2 rewards were 0.0 for 3 steps in a row" in message
    assert watch.update([0.0, 0.0]) is None  # warns again at 6, not every step
    assert watch.update([1.0, 0.0]) is None  # a step with signal resets the count
    assert [watch.update([1.0] * 4) for _ in range(3)][-1].startswith("all 4 rewards were 1.0 for 3 steps in a row")
