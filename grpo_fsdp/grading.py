"""Grading a completion against a gold answer, in-process and without a timeout (`rewards.py` runs these in worker
processes under a wall clock): math-verify equivalence of the last \\boxed{...} with the gold (units of a lone
number stripped on both sides, `answer_units.py`), an anchored answer ("The answer is 72") in the last 1,000
characters when there is no box, the format check, and DAPO's soft overlong penalty (Yu et al. 2025, eq. 13)."""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from grpo_fsdp.answer_units import strip_units
from grpo_fsdp.data.math_dataset import last_boxed

# math-verify warns once that its timeout is disabled; the parent's wall clock replaces it.
logging.getLogger("math_verify").setLevel(logging.ERROR)

BOXED = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
# Without a box, only anchored answers ("the final answer is $18$"): a bare last number anywhere
# in the text would reward a policy that sprays numbers.
ANCHORED = [
    LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0),
    ExprExtractionConfig(try_extract_without_anchor=False),
]
_FALLBACK_TAIL = 1000  # characters searched for an anchored answer when there is no box
_FORMAT_TAIL = 64  # characters allowed after the box ("$.", "The answer is ...") for format_ok



@lru_cache(maxsize=4096)  # each prompt's gold repeats G times per step and across epochs
def parse_gold(gold: str) -> list:
    return parse(f"\\boxed{{{strip_units(gold)}}}", BOXED, parsing_timeout=None)


def find_answer(completion: str) -> tuple[str, str]:
    """What gets graded: ("box", last box content), ("tail", last chars) when there is no box at
    all, or ("none", "") when the last box never closes: a cut-off answer must not score as an
    earlier box that the anchored fallback would find."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return "box", boxed
    if "\\boxed" in completion or "\\fbox" in completion:
        return "none", ""
    return "tail", completion[-_FALLBACK_TAIL:]


def answer_text(completion: str) -> str:
    """The answer a reader sees graded: the last closed \\boxed{} content, or "" (no box, or a cut-off one;
    `grade` then still tries the anchored fallback on the tail)."""
    kind, text = find_answer(completion)
    return text if kind == "box" else ""


def grade_answer(kind: str, text: str, gold: str) -> tuple[bool, bool]:
    """(correct, an answer was extracted); no timeout here, the caller bounds the wall clock."""
    if kind == "box" and text.strip() and text.strip() == gold.strip():
        return True, True  # identical strings: skip sympy (the common case once a policy learns)
    if kind == "none":
        return False, False
    if kind == "box":
        text = strip_units(text)
        if text.strip() == strip_units(gold).strip():
            return True, True  # 20\\% against 20
        pred = parse(f"\\boxed{{{text}}}", BOXED, parsing_timeout=None)
    else:
        pred = parse(text, ANCHORED, parsing_timeout=None)
    if not pred:
        return False, False
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} does not parse")
    return bool(verify(gold_parsed, pred, timeout_seconds=None)), True


def grade(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer is equivalent to gold, else 0.0 (in-process, no timeout)."""
    try:
        return float(grade_answer(*find_answer(completion), gold)[0])
    except Exception:  # noqa: BLE001 (a grading crash is a wrong answer, counted by RewardScorer)
        return 0.0


def format_ok(completion: str) -> bool:
    """Exactly one closed, non-empty \\boxed{} and at most a short tail of text after it."""
    if completion.count("\\boxed") != 1 or "\\fbox" in completion:
        return False
    content = last_boxed(completion)
    opening = completion.rfind("\\boxed") + len("\\boxed")
    while opening < len(completion) and completion[opening] == " ":
        opening += 1
    if content is None or not content.strip() or completion[opening : opening + 1] != "{":
        return False  # unclosed, empty, or the brace-less "\\boxed 5"
    tail = completion[opening + len(content) + 2 :]  # after "{" + content + "}"
    return len(tail.strip()) <= _FORMAT_TAIL


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO eq. 13: 0 up to max_length - buffer, then linear down to -1 at max_length, -1 beyond."""
    if length > max_length:
        return -1.0
    if buffer <= 0 or length <= max_length - buffer:
        return 0.0
    return ((max_length - buffer) - length) / buffer
