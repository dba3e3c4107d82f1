"""Pure scoring arithmetic of the evaluator: pass@k, majority vote, per-group breakdowns.

Nothing here generates or grades; every function takes plain lists (correctness flags, answer
strings, metadata) and returns numbers, so each one is tested against values worked by hand.

    pass@k  (Chen et al. 2021, eq. 1)   1 - C(n - c, k) / C(n, k), averaged over problems,
            with n samples per problem of which c are correct: the probability that at least
            one of k samples drawn without replacement from the n is correct (unbiased for n >= k).
    maj@k   the answer given most often among a problem's first k samples is the prediction;
            ties go to the answer that appeared first (deterministic, independent of hashing).

Departure: the vote compares extracted answers as normalised strings (`answer_key`), not by
math-verify equivalence, so "0.5" and "\\frac{1}{2}" count as different answers. Pairwise
equivalence would need k^2 sympy calls per problem under the grader's timeout; exact string
agreement is what sampled answers mostly show, and the chosen answer is still graded by math-verify.
A sample with no \\boxed{} answer casts no vote.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence
from math import comb

from grpo_fsdp.data.math_dataset import last_boxed

# LaTeX spacing and sizing that never change an answer's meaning.
_NOISE = re.compile(r"\\[!,;:]|\\ |\\left|\\right|\s+")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021) unbiased estimator for one problem: 1 - C(n-c, k) / C(n, k).

    n samples, c of them correct, k <= n. Exact integer binomials (n is small in evaluation).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)  # comb(a, k) = 0 when a < k: then pass@k = 1


def answer_key(completion: str) -> str | None:
    """The vote key of a completion: its last \\boxed{} content, normalised; None without a box.

    Normalisation: spacing commands (\\! \\, \\; \\: "\\ "), \\left / \\right and whitespace are
    removed, \\dfrac / \\tfrac become \\frac, and surrounding $ and a trailing period are dropped.
    """
    boxed = last_boxed(completion)
    if boxed is None:
        return None
    key = _NOISE.sub("", boxed).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    key = key.strip("$").rstrip(".")
    return key or None


def majority_index(keys: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    The winner is the most frequent key; among equally frequent keys the one seen first wins,
    and the index returned is that key's first occurrence.
    """
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    for i, key in enumerate(keys):  # first occurrence order breaks ties
        if key is not None and counts[key] == top:
            return i
    raise AssertionError("unreachable")


def breakdown(groups: Sequence[Hashable], correct: Sequence[bool]) -> dict[str, dict[str, float]]:
    """{group: {correct, total, accuracy}} over samples; the totals add up to len(correct).

    Group labels become strings (JSON keys); None becomes "unknown" and is listed last, integers
    (MATH levels) sort numerically, other labels alphabetically.
    """
    if len(groups) != len(correct):
        raise ValueError(f"breakdown: {len(groups)} group labels for {len(correct)} samples")
    right: Counter = Counter()
    total: Counter = Counter()
    for g, ok in zip(groups, correct):
        total[g] += 1
        right[g] += bool(ok)
    order = sorted((g for g in total if g is not None), key=lambda g: (0, g, "") if isinstance(g, int) else (1, 0, str(g)))
    if None in total:
        order.append(None)
    return {
        ("unknown" if g is None else str(g)): {"correct": right[g], "total": total[g], "accuracy": right[g] / total[g]}
        for g in order
    }


def rate(flags: Sequence[bool | float]) -> float:
    """Mean of flags (0.0 for an empty list)."""
    return sum(flags) / len(flags) if flags else 0.0
