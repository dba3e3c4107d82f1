"""MATH (Hendrycks et al. 2021) and MATH-500 rows -> `Example`, and the \\boxed{} extractor.

Rows look like {"problem", "solution", "answer"?, "level", "type" | "subject", "unique_id"?}.
The hub mirrors differ: the original has no "answer" field (the gold answer is the last
\\boxed{...} of the solution) and spells the level "Level 3"; MATH-500 has "answer", an int
level and "subject" instead of "type". Both shapes parse here.

`last_boxed` is brace-matched rather than a regex because answers nest braces
(\\boxed{\\frac{1}{2}}); the reward code can use the same function on model outputs.
"""

from __future__ import annotations

import re
from typing import Any

from grpo_fsdp.data.records import Example

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_LEVEL = re.compile(r"^\s*(?:level\s*)?([1-5])\s*$", re.IGNORECASE)


def _braced(text: str, start: int) -> str | None:
    """Content of the {...} group opening at text[start]; None if it never closes.

    A backslash escapes the next character, so "\\{" and "\\}" (literal braces in LaTeX set
    notation) do not count towards the nesting depth.
    """
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in text, brace-matched; None if none.

    Also accepts the brace-less form "\\boxed 5" (a few MATH solutions use it), taking the
    token up to the next space or '$'. An unclosed last box (a truncated completion) gives None
    rather than an earlier box, so a cut-off answer never scores as an earlier one.
    """
    pos, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if pos < 0:
        return None
    i = pos + len(cmd)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    if i == pos + len(cmd):  # "\boxedfoo" is another command, not a box; "\boxed" at the end: nothing
        return None
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0) if m else None


def parse_level(value: Any) -> int | None:
    """'Level 3' or 3 -> 3; anything else ('Level ?', missing) -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 5 else None
    if isinstance(value, str) and (m := _LEVEL.match(value)):
        return int(m.group(1))
    return None


def _text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"missing {name!r}")
    if not isinstance(value, str):
        raise ValueError(f"{name!r} is {type(value).__name__}, not a string")  # noqa: TRY004 (ValueError = malformed row)
    if not value.strip():
        raise ValueError(f"empty {name!r}")
    return value.strip()


def parse_math(row: dict[str, Any], row_id: str = "") -> Example:
    """Parse one MATH / MATH-500 row; raises ValueError (counted as malformed by the loader)."""
    problem = _text(row, "problem")
    solution = _text(row, "solution")
    given = row.get("answer")
    if given is not None and not isinstance(given, str):
        given = str(given)  # some mirrors store numeric answers as numbers
    gold = given.strip() if given and given.strip() else last_boxed(solution)
    if gold is None or not gold.strip():
        raise ValueError("no 'answer' and no \\boxed{} answer in 'solution'")
    if last_boxed(solution) is None:
        # Keep the SFT target convention (ends with a boxed answer) for the rare unboxed solution.
        solution = f"{solution}\nThe answer is \\boxed{{{gold}}}."
    subject = row.get("subject") or row.get("type")
    meta = {
        "id": str(row.get("unique_id") or row_id),
        "level": parse_level(row.get("level")),
        "subject": subject if isinstance(subject, str) else None,
    }
    return Example(question=problem, solution=solution, answer=gold.strip(), meta=meta)
