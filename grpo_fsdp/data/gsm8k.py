"""GSM8K (Cobbe et al. 2021) rows -> `Example`.

A row is {"question": str, "answer": str}, where the answer is a worked solution with
calculator annotations like "48/2 = <<48/2=24>>24" and a last line "#### 72".

We turn it into the project's convention: the annotations are removed (they are an artefact of
the original calculator-augmented training, not something the policy should learn to write) and
the "#### N" line becomes "The answer is \\boxed{N}." so that every data set's targets end in a
\\boxed{} answer that the same reward function can read. Thousands separators are removed from
the gold answer ("1,000" -> "1000"), as GSM8K answers are plain numbers.
"""

from __future__ import annotations

import re
from typing import Any

from grpo_fsdp.data.records import Example

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"missing {name!r}")
    if not isinstance(value, str):
        raise ValueError(f"{name!r} is {type(value).__name__}, not a string")  # noqa: TRY004 (ValueError = malformed row)
    if not value.strip():
        raise ValueError(f"empty {name!r}")
    return value


def gsm8k_gold(answer_text: str) -> str:
    """The final answer after '####', without thousands separators; ValueError if absent."""
    if "####" not in answer_text:
        raise ValueError("no '####' in 'answer'")
    gold = answer_text.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError("nothing after '####' in 'answer'")
    return gold


def parse_gsm8k(row: dict[str, Any], row_id: str = "") -> Example:
    """Parse one GSM8K row; raises ValueError (counted as malformed by the loader)."""
    question = _field(row, "question").strip()
    answer_text = _field(row, "answer")
    gold = gsm8k_gold(answer_text)
    worked = _CALCULATOR.sub("", answer_text.rsplit("####", 1)[0]).strip()
    final = f"The answer is \\boxed{{{gold}}}."
    solution = f"{worked}\n{final}" if worked else final
    return Example(question=question, solution=solution, answer=gold, meta={"id": row_id, "level": None, "subject": None})
