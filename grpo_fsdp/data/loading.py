"""`load_examples(cfg, split)`: one entry point from a DataConfig to a list of `Example`s.

Sources, in order of precedence:
  * data.name=arithmetic: the synthetic generator (no files, no network);
  * data.path set: local JSONL, either the file itself or a directory holding <split>.jsonl
    (for math500 a directory may hold math500.jsonl instead, as ../shared/data/math does);
  * otherwise the hub: datasets.load_dataset(data.hub_id, data.hub_config, split=split).

A malformed row (bad JSON, a missing field, no final answer) is skipped, not fatal: real dumps
have a few, and one bad line should not end a long run. The skips are counted and reported in
one line on stderr; a source with no usable row at all is a UserError (one line, with the fix).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import DataConfig
from grpo_fsdp.data.arithmetic import make_arithmetic
from grpo_fsdp.data.gsm8k import parse_gsm8k
from grpo_fsdp.data.math_dataset import parse_math
from grpo_fsdp.data.records import Example

Parser = Callable[[dict[str, Any], str], Example]
PARSERS: dict[str, Parser] = {"gsm8k": parse_gsm8k, "math": parse_math, "math500": parse_math}
EXPECTED_FIELDS = {"gsm8k": "'question' and 'answer' with '#### N'", "math": "'problem' and 'solution' with \\boxed{}"}
EXPECTED_FIELDS["math500"] = EXPECTED_FIELDS["math"]


def resolve_path(cfg: DataConfig, split: str) -> str:
    """The JSONL file to read for `split` when data.path is set; UserError if there is none."""
    path = os.path.expanduser(cfg.path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"data.path={cfg.path!r} does not exist; point it at a JSONL file or a directory of <split>.jsonl files")
    # math500.jsonl first: beside it, test.jsonl is usually the full 5,000-problem MATH test set.
    names = (["math500.jsonl"] if cfg.name == "math500" else []) + [f"{split}.jsonl"]
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(
        f"data.path={cfg.path!r} holds no {' or '.join(names)} for split {split!r}; "
        f"add the file or point data.path at the JSONL file itself"
    )


def _jsonl_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None, problem) for each non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield lineno, None, "bad JSON"
                continue
            if not isinstance(row, dict):
                yield lineno, None, f"a JSON {type(row).__name__}, not an object"
                continue
            yield lineno, row, ""


def _hub_rows(cfg: DataConfig, split: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    if not cfg.hub_id:
        raise UserError(f"data.hub_id is empty for data.name={cfg.name}; set data.path=<local JSONL file or directory>")
    try:
        import datasets  # imported here: slow to import, and unused by arithmetic runs

        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config or None, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, missing config or split all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"data: could not load {cfg.hub_id!r} (config {cfg.hub_config or None!r}, split {split!r}) from the hub "
            f"({type(e).__name__}: {first}); set data.path=<local JSONL file or directory of <split>.jsonl>"
        ) from None
    for i, row in enumerate(ds, start=1):
        yield i, dict(row), ""


def parse_rows(
    rows: Iterable[tuple[int, dict[str, Any] | None, str]], parser: Parser, source: str
) -> tuple[list[Example], int, Counter[str]]:
    """Parse rows, skipping malformed ones: (examples, rows seen, Counter of skip reasons)."""
    examples, total, reasons, first_line = [], 0, Counter(), {}
    for lineno, row, problem in rows:
        total += 1
        if row is not None:
            try:
                examples.append(parser(row, f"{source}:{lineno}"))
                continue
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                problem = str(e) or type(e).__name__
        reasons[problem] += 1
        first_line.setdefault(problem, lineno)
    # Keep the first row number of each reason in the key text, so the summary can point at it.
    located = Counter({f"{reason} (first at row {first_line[reason]})": n for reason, n in reasons.items()})
    return examples, total, located


def _summary(reasons: Counter[str], limit: int = 3) -> str:
    parts = [f"{n}x {reason}" for reason, n in reasons.most_common(limit)]
    if len(reasons) > limit:
        parts.append(f"{len(reasons) - limit} more kinds")
    return "; ".join(parts)


def load_examples(cfg: DataConfig, split: str, limit: int | None = None) -> list[Example]:
    """Examples of `split` for data.name, with malformed rows skipped and reported once.

    limit: keep the first `limit` usable examples (0: all). None means data.limit for the
    training split (its documented meaning) and all rows for any other split, so evaluation
    is not silently shrunk by a training-speed setting.
    """
    if limit is None:
        limit = cfg.limit if split == cfg.train_split else 0
    if cfg.name == "arithmetic":
        kind = "train" if split in ("train", cfg.train_split) else "test" if split in ("test", cfg.test_split) else split
        examples = make_arithmetic(cfg.arithmetic, kind)
        return examples[:limit] if limit > 0 else examples
    if cfg.name not in PARSERS:
        raise UserError(f"data.name={cfg.name!r} is unknown; choose one of arithmetic, {', '.join(PARSERS)}")

    where = f"{cfg.name}/{split}"
    if cfg.path:
        path = resolve_path(cfg, split)
        source, rows = path, _jsonl_rows(path)
    else:
        source, rows = f"hub {cfg.hub_id}", _hub_rows(cfg, split)
    examples, total, reasons = parse_rows(rows, PARSERS[cfg.name], where)
    skipped = sum(reasons.values())
    if not examples:
        why = f"all {total} rows are malformed ({_summary(reasons)})" if total else "it has no rows"
        raise UserError(
            f"data: no usable rows in {source} for {where}: {why}; "
            f"data.name={cfg.name} expects JSON objects with {EXPECTED_FIELDS[cfg.name]}, so check data.name and data.path"
        )
    if skipped:
        print(f"data: skipped {skipped} of {total} rows of {where} from {source} (malformed: {_summary(reasons)})",
              file=sys.stderr)
    return examples[:limit] if limit > 0 else examples
