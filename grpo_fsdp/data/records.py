"""The one record every data set is parsed into, whatever its source format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """A math problem with a worked solution and its gold final answer.

    question: the problem text, as shown to the model (before any template).
    solution: a worked solution that ends with the final answer in \\boxed{...}; the SFT target.
    answer:   the gold final answer string that rewards and evaluation compare against.
    meta:     id, level (int 1-5 or None), subject (or None), plus source-specific extras.
    """

    question: str
    solution: str
    answer: str
    # Excluded from hashing so that Examples stay hashable (sets, dict keys) despite the dict.
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
