"""Preference pairs for DPO: rows of prompt / chosen / rejected, rendered and tokenized with a stated truncation.

Row formats (local JSONL via data.path, or the hub via data.hub_id; `data=preference`):

    plain           {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational  {"chosen": [messages], "rejected": [messages]}: message lists ({"role", "content"}) that
                    share the prompt turns, the hub's preference format; the shared leading messages are the
                    prompt, the rest of each list its completion. A "prompt" key (a string or a message list)
                    may give the prompt explicitly; chosen/rejected may then hold only the answer (a string or
                    the assistant messages), or the whole conversation starting with the prompt's messages.

`data=preference_arithmetic` is the built-in synthetic set (`preference_arithmetic.py`), so DPO runs offline.

Rendering: a message prompt goes through the tokenizer's chat template with the generation prompt; its
completion is what the template writes after that prompt for the full conversation (e.g. Qwen's
"answer<|im_end|>\\n"). A plain-string prompt is rendered like an SFT/GRPO question (`templates.render_prompt`,
data.instruction appended), its completions as the SFT targets are (`text + EOS`), so DPO after SFT sees
exactly the prompts and completion format SFT trained on.

Truncation (`tokenize_pairs`), the strategy TRL calls keep_end for prompts:
  * a prompt over data.max_prompt_length tokens keeps its LAST max_prompt_length tokens (the question
    nearest the answer; a leading BOS or system turn is what is lost);
  * each completion is cut to data.max_length - len(prompt) tokens (a cut completion loses its EOS).
Skipped rows, counted in one stderr line: an empty side, chosen equal to rejected, and pairs that become
identical once truncated (no preference left to learn). No row left at all is a UserError naming the cause.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import DataConfig
from grpo_fsdp.data.loading import _hub_rows, _jsonl_rows, _summary, parse_rows, resolve_path
from grpo_fsdp.data.templates import bos_prefix, render_prompt, resolve_template

PREFERENCE_DATASETS = ("preference", "preference_arithmetic")
EXPECTED = "'prompt', 'chosen' and 'rejected' (strings), or 'chosen' and 'rejected' chat message lists sharing the prompt turns"

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PreferencePair:
    """One row: a prompt (plain text or chat messages) and two completions of it (text or messages)."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages


@dataclass
class PreferenceSample:
    """Token ids of one usable pair, after truncation."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        """Tokens of the longer padded row: prompt + max(chosen, rejected) (length grouping, the length report)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def tokens(self) -> int:
        """Tokens the shared-prefix layout processes: the prompt once, both completions."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise ValueError(f"'{name}' is neither a string nor a list of {{role, content}} messages")
    return value


def parse_preference(row: dict[str, Any], where: str) -> PreferencePair:
    """A raw row -> PreferencePair; ValueError (the reason, counted by the loader) when it is malformed."""
    del where
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise ValueError(f"no '{key}' field")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str | list):
            raise TypeError("no 'prompt' field (string completions need one)")
        return PreferencePair(prompt if isinstance(prompt, str) else _messages(prompt, "prompt"), chosen, rejected)
    chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else _messages(chosen, "chosen")
    rejected = [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else _messages(rejected, "rejected")
    if prompt is None:  # the shared leading messages are the prompt
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise ValueError("no 'prompt' field and no shared leading messages in 'chosen' and 'rejected'")
        return PreferencePair(chosen[:k], chosen[k:], rejected[k:])
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    k = len(prompt)
    strip = lambda side: side[k:] if side[:k] == prompt else side
    return PreferencePair(prompt, strip(chosen), strip(rejected))


def load_pairs(cfg: DataConfig, split: str, limit: int | None = None) -> list[PreferencePair]:
    """The pairs of `split` for data.name (preference or preference_arithmetic), malformed rows counted once."""
    if limit is None:
        limit = cfg.limit if split == cfg.train_split else 0
    if cfg.name == "preference_arithmetic":
        from grpo_fsdp.data.preference_arithmetic import make_arithmetic_pairs

        pairs = make_arithmetic_pairs(cfg.arithmetic, "train" if split == cfg.train_split else "test")
        return pairs[:limit] if limit > 0 else pairs
    if cfg.name != "preference":
        raise UserError(f"data.name={cfg.name!r} holds no preference pairs; DPO needs data=preference (data.path=<file."
                        "jsonl> or data.hub_id=<id>) or data=preference_arithmetic")
    where = f"preference/{split}"
    source, rows = (resolve_path(cfg, split), None) if cfg.path else (f"hub {cfg.hub_id}", _hub_rows(cfg, split))
    if rows is None:
        rows = _jsonl_rows(source)
    pairs, total, reasons = parse_rows(rows, parse_preference, where)
    if not pairs:
        why = f"all {total} rows are malformed ({_summary(reasons)})" if total else "it has no rows"
        raise UserError(f"data: no usable preference pairs in {source}: {why}; data=preference expects JSON objects "
                        f"with {EXPECTED}; fix the file or point data.path at another")
    if reasons:
        print(f"data: skipped {sum(reasons.values())} of {total} rows of {where} from {source} (malformed: "
              f"{_summary(reasons)})", file=sys.stderr)
    return pairs[:limit] if limit > 0 else pairs


def _completion(tokenizer: Any, prompt_msgs: Messages, prompt_text: str, side: Messages) -> str:
    """What the chat template writes after `prompt_text` for the conversation prompt + side."""
    full = tokenizer.apply_chat_template(prompt_msgs + side, tokenize=False)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    return "".join(str(m["content"]) for m in side) + (tokenizer.eos_token or "")  # a template that rewrites history


def _empty(side: str | Messages) -> bool:
    return not (side.strip() if isinstance(side, str) else any(str(m.get("content", "")).strip() for m in side))


def render_pair(pair: PreferencePair, tokenizer: Any, template: str, instruction: str) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text): see the module docstring."""
    if isinstance(pair.prompt, str):
        lead = "" if resolve_template(tokenizer, template) == "chat" else " "
        texts = [s if isinstance(s, str) else "".join(str(m["content"]) for m in s) for s in (pair.chosen, pair.rejected)]
        return render_prompt(tokenizer, pair.prompt, template, instruction), *(lead + t + (tokenizer.eos_token or "") for t in texts)
    if resolve_template(tokenizer, template) != "chat":
        raise UserError("data: conversational preference rows need a chat template, but model.template resolves to plain; "
                        "set model.template=auto with a tokenizer that has one (model.tokenizer=...), or give string rows")
    prompt_text = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=False)
    sides = [[{"role": "assistant", "content": s}] if isinstance(s, str) else s for s in (pair.chosen, pair.rejected)]
    return prompt_text, *(_completion(tokenizer, pair.prompt, prompt_text, s) for s in sides)


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, template: str, instruction: str, max_prompt_length: int,
                   max_length: int, quiet: bool = False) -> list[PreferenceSample]:
    """Usable pairs as token ids, truncated and filtered as the module docstring says (one summary line)."""
    skipped: Counter[str] = Counter()
    kept: list[tuple[str, str, str]] = []
    for pair in pairs:
        if _empty(pair.chosen) or _empty(pair.rejected) or _empty(pair.prompt):
            skipped["an empty side"] += 1
            continue
        texts = render_pair(pair, tokenizer, template, instruction)
        if texts[1] == texts[2]:
            skipped["chosen equal to rejected"] += 1
            continue
        kept.append(texts)
    cols = list(zip(*kept)) or [(), (), ()]
    ids = [tokenizer(list(c), add_special_tokens=False)["input_ids"] if c else [] for c in cols]
    samples, cut_prompts, cut_completions = [], 0, 0
    for (p_text, _, _), p, c, r in zip(kept, *ids):
        p = bos_prefix(tokenizer, p_text) + list(p)
        if len(p) > max_prompt_length:
            p, cut_prompts = p[-max_prompt_length:], cut_prompts + 1
        room = max_length - len(p)
        cut_completions += (len(c) > room) + (len(r) > room)
        c, r = list(c[:room]), list(r[:room])
        if c == r:
            skipped["identical once truncated"] += 1
            continue
        samples.append(PreferenceSample(p, c, r))
    if pairs and not samples:
        raise UserError(f"data: no preference pair is usable: all {len(pairs)} rows skipped ({_summary(skipped)}); "
                        "check that chosen and rejected differ and are non-empty, and that data.max_length leaves room "
                        "after data.max_prompt_length")
    if (skipped or cut_prompts or cut_completions) and not quiet:
        print(f"data: {len(samples)} of {len(pairs)} preference pairs kept; skipped {sum(skipped.values())}"
              f"{' (' + _summary(skipped) + ')' if skipped else ''}; kept the last data.max_prompt_length="
              f"{max_prompt_length} tokens of {cut_prompts} prompts; cut {cut_completions} completions to "
              f"data.max_length={max_length}", file=sys.stderr)
    return samples
