"""Semantic entropy of a prompt's sampled answers (SENT, arXiv 2512.04359; Kuhn et al. 2023, arXiv 2302.09664).

M completions of one prompt are reduced to their final answers with the extraction the rewards use
(`grading.find_answer`: the last \\boxed{...}, else an anchored "the answer is ..." near the end), and
clustered by equivalence under the rewards' grader (`grading.grade_answer`: units stripped, then
math-verify), so 0.5 and \\frac12 share a cluster exactly when the reward would call them equal.
A completion with no extractable answer (no box and no anchor, an unclosed box, an unparsable
answer) is a cluster of its own: M refusals are maximally uncertain, not one confident answer.

    H = -sum_c p(c) log p(c),  p(c) = |c| / M   (natural log; answers 4,4,4,5: H = 0.5623)

Clustering is greedy: each answer joins the first cluster whose representative (its first member)
it equals, as in Kuhn et al.; math-verify equivalence is not guaranteed transitive, and this is the
usual way to make it a partition. Grading runs in this process without a timeout (the curriculum tool
is offline); identical strings skip sympy, which settles most answers of a confident prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from grpo_fsdp.answer_units import strip_units


def final_answer(completion: str) -> str | None:
    """The completion's final answer as a string the grader can take as gold, or None when it has none."""
    from math_verify import parse

    from grpo_fsdp.grading import ANCHORED, find_answer

    kind, text = find_answer(completion)
    if kind == "box":
        return text.strip() or None
    if kind == "none":
        return None
    try:
        found = parse(text, ANCHORED, parsing_timeout=None)
    except Exception:  # noqa: BLE001  an answer the parser chokes on is no answer
        return None
    return str(found[-1]).strip() or None if found else None


def same_answer(a: str, b: str) -> bool:
    """Equivalence under the rewards' grader: `a` graded as a boxed prediction against gold `b`."""
    if a == b or strip_units(a).strip() == strip_units(b).strip():
        return True
    from grpo_fsdp.grading import grade_answer

    try:
        return grade_answer("box", a, b)[0]
    except Exception:  # noqa: BLE001  a gold that does not parse equals nothing but itself
        return False


def clusters(answers: Sequence[str | None]) -> list[tuple[str | None, int]]:
    """(representative, size) of each answer cluster, in order of first appearance; each None is a singleton."""
    out: list[list] = []
    for answer in answers:
        if answer is not None:
            match = next((c for c in out if c[0] is not None and same_answer(answer, c[0])), None)
            if match is not None:
                match[1] += 1
                continue
        out.append([answer, 1])
    return [(rep, size) for rep, size in out]


def cluster_sizes(answers: Sequence[str | None]) -> list[int]:
    return [size for _, size in clusters(answers)]


def correct_count(groups: Sequence[tuple[str | None, int]], gold: str) -> int:
    """Samples whose answer the rewards grade as equal to `gold` (one grading per cluster)."""
    return sum(size for rep, size in groups if rep is not None and same_answer(rep, gold))


def semantic_entropy(sizes: Sequence[int]) -> float:
    """H = -sum p log p over clusters of the given sizes (natural log); 0 for one cluster."""
    total = sum(sizes)
    if total <= 0 or any(s <= 0 for s in sizes):
        raise ValueError(f"cluster sizes must be positive, got {list(sizes)}")
    return -sum((s / total) * math.log(s / total) for s in sizes)
