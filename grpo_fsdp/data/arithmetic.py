"""Synthetic arithmetic: the task the tiny model can actually learn in a CPU test run.

Each problem is 2 or 3 integer operands in [min_operand, max_operand] joined by operators from
cfg.ops ("+", "-", "*"), e.g. "What is 7 + 12 - 5?", with a worked chain as the solution:
"7 + 12 = 19. 19 - 5 = 14. The answer is \\boxed{14}." Multiplication binds first, as in the
written expression (and Python's eval), so "2 + 3 * 4" is worked as "3 * 4 = 12. 2 + 12 = 14.".

`estimate_share` > 0 replaces that share of the train split's solutions (drawn from their own seed stream, so the
problems do not change) by a careless one that states the value rounded to the nearest ten without working:
"The answer is about \\boxed{10}." It is right only when the value is a multiple of ten. The demo trains its SFT
model on half of each, so that the model has a habit an exact-answer reward can remove (demo.py). The test split's
solutions are always worked; every `answer` is the exact value.

Determinism: the output is a pure function of (cfg, split). The test split is drawn first from
its own seed stream; the train split comes from another stream and skips every test question,
so the two never overlap. Questions are distinct within a split.
"""

from __future__ import annotations

import random

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import ArithmeticConfig
from grpo_fsdp.data.records import Example

SPLITS = ("train", "test")


def _num(x: int) -> str:
    # Parenthesised negatives keep "5 - (-3)" readable and valid for eval.
    return f"({x})" if x < 0 else str(x)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def expression(operands: list[int], ops: list[str]) -> str:
    """'7 + 12 - 5' from [7, 12, 5] and ['+', '-']."""
    parts = [_num(operands[0])]
    for op, x in zip(ops, operands[1:]):
        parts += [op, _num(x)]
    return " ".join(parts)


def worked_solution(operands: list[int], ops: list[str]) -> tuple[str, int]:
    """The step-by-step chain and the value, with '*' before '+'/'-' (left to right otherwise)."""
    nums, ops = list(operands), list(ops)
    steps = []
    for precedence in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] in precedence:
                value = _apply(nums[i], ops[i], nums[i + 1])
                steps.append(f"{_num(nums[i])} {ops[i]} {_num(nums[i + 1])} = {value}.")
                nums[i : i + 2] = [value]
                del ops[i]
            else:
                i += 1
    (value,) = nums
    steps.append(f"The answer is \\boxed{{{value}}}.")
    return " ".join(steps), value


def rounded_estimate(value: int) -> str:
    """The careless solution: the value rounded to the nearest ten (halves up), stated without working."""
    return f"The answer is about \\boxed{{{(value + 5) // 10 * 10}}}."


def _draw(rng: random.Random, cfg: ArithmeticConfig) -> tuple[list[int], list[str]]:
    # Uniform over the problem space, not 50/50 between 2 and 3 operands: with few 2-operand questions
    # (100 for sums of 0-9) a 50/50 draw lets the test split, drawn first, take nearly all of them and
    # leaves the train split almost none (measured: 40% of the demo's test split vs 2% of its train split).
    r, k = cfg.max_operand - cfg.min_operand + 1, len(set(cfg.ops))
    n = 2 if rng.random() * problem_space(cfg) < r * r * k else 3
    operands = [rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(n)]
    return operands, [rng.choice(list(cfg.ops)) for _ in range(n - 1)]


def _generate(cfg: ArithmeticConfig, split: str, count: int, exclude: set[str]) -> list[Example]:
    # A string seed is hashed with SHA-512 by `random`: stable across runs, platforms and versions.
    rng = random.Random(f"arithmetic:{cfg.seed}:{split}")
    # Its own stream, so the problems are the same whatever estimate_share is.
    careless = random.Random(f"arithmetic:{cfg.seed}:{split}:estimate")
    share = cfg.estimate_share if split == "train" else 0.0
    seen, out = set(exclude), []
    attempts, budget = 0, 50 * count + 10_000  # rejection sampling; the space check makes this ample
    while len(out) < count:
        attempts += 1
        if attempts > budget:
            raise UserError(
                f"data.arithmetic: could only draw {len(out)} of {count} distinct {split} problems; "
                "widen min_operand..max_operand, add ops, or lower num_train/num_test"
            )
        operands, ops = _draw(rng, cfg)
        question = f"What is {expression(operands, ops)}?"
        if question in seen:
            continue
        seen.add(question)
        solution, value = worked_solution(operands, ops)
        if careless.random() < share:
            solution = rounded_estimate(value)
        meta = {"id": f"arithmetic/{split}/{len(out)}", "level": None, "subject": "arithmetic",
                "expression": expression(operands, ops)}
        out.append(Example(question=question, solution=solution, answer=str(value), meta=meta))
    return out


def problem_space(cfg: ArithmeticConfig) -> int:
    """How many distinct questions the settings allow (2- and 3-operand expressions)."""
    r, k = cfg.max_operand - cfg.min_operand + 1, len(set(cfg.ops))
    return r * r * k + r**3 * k * k


def make_arithmetic(cfg: ArithmeticConfig, split: str) -> list[Example]:
    """The `split` ('train' or 'test') problems: num_train / num_test of them, deterministic."""
    if split not in SPLITS:
        raise UserError(f"data.arithmetic: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not cfg.ops or any(op not in ("+", "-", "*") for op in cfg.ops):
        raise UserError(f"data.arithmetic.ops={list(cfg.ops)} is invalid; use a non-empty subset of ['+', '-', '*']")
    if cfg.max_operand < cfg.min_operand:
        raise UserError(f"data.arithmetic.max_operand={cfg.max_operand} < min_operand={cfg.min_operand}; swap them")
    if cfg.num_train + cfg.num_test > problem_space(cfg):
        raise UserError(
            f"data.arithmetic: num_train + num_test = {cfg.num_train + cfg.num_test} exceeds the "
            f"{problem_space(cfg)} distinct problems the operand range and ops allow; widen the range or ask for fewer"
        )
    test = _generate(cfg, "test", cfg.num_test, exclude=set())
    if split == "test":
        return test
    return _generate(cfg, "train", cfg.num_train, exclude={e.question for e in test})
