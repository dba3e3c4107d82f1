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

from grpo_fsdp.answer_units import strip_units
from grpo_fsdp.data.gsm8k import gsm8k_gold
from grpo_fsdp.grading import format_ok, grade, overlong_penalty
from grpo_fsdp.rewards import ConstantRewardWatch, RewardScorer, RewardWeights, timeout_warning

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
    ("20", "20\\%"),  # units, answer_units.py
]


@pytest.mark.parametrize(("gold", "boxed"), EQUIVALENT)
def test_equivalent_forms_in_process(gold, boxed):
    assert grade(f"So the answer is $\\boxed{{{boxed}}}$.", gold) == 1.0


UNITS_RIGHT = [  # (gold, what the model boxed): one number with units around it scores as the number
    ("20", "20\\%"),
    ("20", "20%"),
    ("20", "20\\,\\%"),
    ("20", "20 percent"),
    ("20", "20 dollars"),
    ("20", "20.00 dollars"),
    ("20", "\\text{20 dollars}"),
    ("20", "\\text{\\$}20"),
    ("1000", "\\$1,000"),
    ("1234567", "1{,}234{,}567\\text{ dollars}"),
    ("-5", "-5\\%"),
    ("20\\%", "20"),  # a MATH gold with a percent sign
    ("20\\%", "20\\%"),
]
UNITS_WRONG = [  # ... and nothing else changes: a wrong number stays wrong, a variable is not a unit
    ("20", "21\\%"),
    ("21", "20\\%"),
    ("0.2", "20\\%"),  # a percentage is compared as its number (answer_units.py says why)
    ("200", "20\\%"),
    ("100", "\\$1,000"),
    ("12", "1,2"),
    ("1234", "12,34"),
    ("10000", "1,0000"),
    ("2", "2x"),
    ("5", "5x"),
    ("5x", "5"),
    ("20", "20 \\text{ or } 30"),
    ("5", "\\$5.50"),
]


@pytest.mark.parametrize(("gold", "boxed"), UNITS_RIGHT)
def test_units_around_a_number_are_stripped(gold, boxed):
    assert grade(f"So the answer is $\\boxed{{{boxed}}}$.", gold) == 1.0


@pytest.mark.parametrize(("gold", "boxed"), UNITS_WRONG)
def test_units_stripping_keeps_wrong_answers_wrong(gold, boxed):
    assert grade(f"So the answer is $\\boxed{{{boxed}}}$.", gold) == 0.0


def test_strip_units_leaves_everything_but_a_lone_number_alone():
    assert [strip_units(a) for a in ("20\\%", "\\$1{,}000.50", "\\text{7 cents}", "1,000", ".5\\%")] == [
        "20", "1000.50", "7", "1000", "0.5"]
    for answer in ("20", "\\frac{1}{2}", "(1,2)", "1,2", "5x", "\\text{(C)}", "20\\text{ or }30", "x\\%", "\\$"):
        assert strip_units(answer) == answer


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


def test_step_budget_bounds_the_scoring_time():
    """Six distinct hanging answers on two workers took 3 x timeout_s plus two worker restarts; with a budget the
    step ends at the budget: the two cut by their own timeout count as timeouts, the four left when the budget
    ran out as timeouts and over_budget, and the pool then grades as before."""
    towers = [f"\\boxed{{9^{{9^{{9^{{{d}}}}}}}}}" for d in range(3, 9)]  # 9^(9^(9^3)) and up: sympy never ends
    with RewardScorer(num_workers=2, timeout_s=1.5) as scorer:
        scorer.wait_ready()
        start = time.monotonic()
        result = scorer.score(["\\boxed{5}", "\\boxed{6}", *towers], ["5"] * 8, [10] * 8, max_length=100, budget_s=2.5)
        elapsed = time.monotonic() - start
        assert result.statuses == ["ok", "ok", "timeout", "timeout"] + ["over_budget"] * 4
        assert result.rewards == [1.0] + [0.0] * 7
        assert (result.timeouts, result.over_budget, result.parse_failures) == (6, 4, 0)
        assert result.metrics()["reward/over_budget"] == 4.0
        assert 2.5 <= elapsed < 2.5 + 1.5, elapsed
        assert _score(scorer, ["\\boxed{5}", "\\boxed{7}"], ["5", "5"]).rewards == [1.0, 0.0]


def test_timeout_warning_passes_a_share_of_the_step():
    assert timeout_warning(3, timeouts=6, over_budget=0, n=64, share=0.1, timeout_s=5, budget_s=30) is None  # 9%
    assert timeout_warning(3, timeouts=0, over_budget=0, n=0, share=0.0, timeout_s=5, budget_s=30) is None
    assert timeout_warning(3, timeouts=7, over_budget=0, n=64, share=0.1, timeout_s=5, budget_s=30) == (
        "step 3: 7 of 64 answers (11%) scored 0 because grading timed out (algo.reward_timeout_s=5 per answer, "
        "algo.reward_step_budget_s=30 per step); runaway or adversarial answers? raise those limits or "
        "algo.reward_workers if honest answers are slow")
    message = timeout_warning(9, timeouts=32, over_budget=20, n=64, share=0.1, timeout_s=2.5, budget_s=12.5)
    assert message.startswith("step 9: 32 of 64 answers (50%) scored 0 because grading timed out, 20 of them when "
                              "the step's 12.5 s budget ran out (algo.reward_timeout_s=2.5 per answer, ")


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
