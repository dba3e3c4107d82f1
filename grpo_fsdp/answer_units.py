"""Units around a final numeric answer: `20\\%`, `\\$1,000`, `20 dollars`, `\\text{20 percent}` -> the number.

math-verify cannot parse some of these inside a box: `\\boxed{20\\%}` against the gold `20` scored 0,
which cost GSM8K's percentage questions. Before grading, a final answer (the model's box and the gold
alike) that is exactly ONE number with units around it is replaced by the bare number; anything else
(expressions, tuples, intervals, `5x`, text answers) is left to math-verify untouched. This follows
the answer normalisation of MATH (Hendrycks et al. 2021, `strip_string`: drop `\\%`, `\\$` and
`\\text{ units}`) and Minerva (Lewkowycz et al. 2022: drop units and thousands separators).

What counts as units: a leading `$` / `\\$`; a trailing `%` / `\\%`; a trailing `\\text{...}` (also
`\\mbox`, `\\mathrm`) holding only letters, spaces and `\\%`; the words in `_UNIT_WORDS`. Thousands
separators are removed only in a well-formed grouping (`1,000`, `1{,}234,567`; not `1,2` nor `12,34`).
Departure: a percentage is compared as its number, so `20\\%` equals `20` and not `0.2` (the gold
answers of GSM8K and MATH write the number the question asks for).
"""

from __future__ import annotations

import re

# Bare words after the number, whitelisted: a letter after a number is often a variable (`5x`).
_UNIT_WORDS = r"percent|per\s*cent|percentage\s+points|dollars?|cents?|usd"
_SPACE = r"(?:\s|\\[,;:! ]|\\quad|~)*"
_NUMBER = r"(?P<sign>[-+]?)(?P<int>\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)?(?P<frac>\.\d+)?"
_CURRENCY = r"(?P<cur>\\\$|\$|\\text\{\s*\\\$\s*\})?"
_UNIT = rf"(?P<unit>\\%|%|\\(?:text|mbox|mathrm)\{{[A-Za-z\s\\%]*\}}|(?:{_UNIT_WORDS})\b)?"
_WITH_UNITS = re.compile(rf"{_CURRENCY}{_SPACE}{_NUMBER}{_SPACE}{_UNIT}\.?", re.IGNORECASE)
_WRAPPED = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{(?P<inner>[^{}]*(?:\{,\}[^{}]*)*)\}")


def strip_units(answer: str) -> str:
    """The bare number when `answer` is one number with currency, percent, unit words or thousands
    separators; otherwise `answer` unchanged."""
    text = answer.strip()
    if wrapped := _WRAPPED.fullmatch(text):  # \\text{20 dollars}: the whole answer as text
        text = wrapped["inner"].strip()
    m = _WITH_UNITS.fullmatch(text)
    if m is None or not (m["int"] or m["frac"]):
        return answer
    number = m["sign"] + re.sub(r",|\{,\}", "", m["int"] or "0") + (m["frac"] or "")
    return number if number != text else answer
