"""The built-in synthetic preference set (`data=preference_arithmetic`): arithmetic pairs, so DPO runs offline.

Each problem of the synthetic arithmetic task (`arithmetic.py`, same settings and splits) becomes one pair:

    prompt    the question ("What is 7 + 12 - 5?"), rendered like the SFT / GRPO prompt
    chosen    the worked correct solution, the SFT target: "7 + 12 = 19. 19 - 5 = 14. The answer is \\boxed{14}." (always
              worked: with data.arithmetic.estimate_share > 0 the SFT target of some problems is an estimate)
    rejected  the same chain with one wrong intermediate result that the later steps carry on:
              "7 + 12 = 21. 21 - 5 = 16. The answer is \\boxed{16}." (same shape, same length up to digits)

The wrong step and the error (+-1..3) are drawn from a seed stream of (data.arithmetic.seed, split, index), so the
set is a pure function of the settings. A pair whose error cancels out (a later "* 0") draws again.
"""

from __future__ import annotations

import random

from grpo_fsdp.config import ArithmeticConfig
from grpo_fsdp.data.arithmetic import make_arithmetic, worked_solution
from grpo_fsdp.data.preference import PreferencePair

ERRORS = (-3, -2, -1, 1, 2, 3)


def _num(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


def parse_expression(expr: str) -> tuple[list[int], list[str]]:
    """'7 + (-2) * 3' -> ([7, -2, 3], ['+', '*']) (the inverse of arithmetic.expression)."""
    parts = expr.split(" ")
    return [int(p.strip("()")) for p in parts[0::2]], parts[1::2]


def worked_chain(operands: list[int], ops: list[str], wrong_step: int = -1, error: int = 0) -> tuple[str, int]:
    """The step-by-step solution (`*` first, then `+`/`-` left to right), with `error` added to the result of step
    `wrong_step` (-1: none) and carried into the later steps. Without an error it is arithmetic.worked_solution."""
    nums, ops, steps = list(operands), list(ops), []
    for precedence in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] not in precedence:
                i += 1
                continue
            a, op, b = nums[i], ops[i], nums[i + 1]
            value = (a + b if op == "+" else a - b if op == "-" else a * b) + (error if len(steps) == wrong_step else 0)
            steps.append(f"{_num(a)} {op} {_num(b)} = {value}.")
            nums[i : i + 2] = [value]
            del ops[i]
    steps.append(f"The answer is \\boxed{{{nums[0]}}}.")
    return " ".join(steps), nums[0]


def make_arithmetic_pairs(cfg: ArithmeticConfig, split: str) -> list[PreferencePair]:
    """One pair per problem of the arithmetic `split` ('train' or 'test')."""
    pairs = []
    for index, ex in enumerate(make_arithmetic(cfg, split)):
        operands, ops = parse_expression(ex.meta["expression"])
        rng = random.Random(f"preference_arithmetic:{cfg.seed}:{split}:{index}")
        while True:
            wrong, value = worked_chain(operands, ops, rng.randrange(len(ops)), rng.choice(ERRORS))
            if str(value) != ex.answer:
                break
        chosen, _ = worked_solution(operands, ops)
        pairs.append(PreferencePair(prompt=ex.question, chosen=chosen, rejected=wrong))
    return pairs
