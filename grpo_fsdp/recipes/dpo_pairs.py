"""Preference pairs through the network: each prompt once, its chosen and rejected completions attending to it.

A DPO micro-batch of n pairs is laid out with GRPO's shared-prefix layout (`shared_prefix.pack`, group size 2):

    [ prompt 0 | ... | prompt n-1 | chosen 0 | rejected 0 | chosen 1 | rejected 1 | ... ]   owner = 0 0 1 1 ...

so a prompt's tokens go through every layer once, not twice as in padded [chosen; rejected] rows, with no
padding between a prompt and its completions, completions padded only within length blocks. Every completion
token sees exactly what it sees in its own padded row (rotary positions continue from its prompt's length), so
the summed log-probs equal the padded, separately computed ones to float rounding (tests/test_dpo_pairs.py).
On CUDA with flash-attn, `hardware.grpo_attention` may re-lay the same micro-batch out fully padding-free
(`varlen.py`); the policy picks the kernel per micro-batch (`grpo_attention.choose`).

`algo.shared_prefix=false` lays the pairs out as 2n right-padded rows [prompt + chosen], [prompt + rejected]
instead (`pad_pairs`): the prompt runs twice, but any attention the model has works, e.g. the sliding windows
of OLMo 3 (3 of 4 layers, 4096 tokens) that the shared-prefix attention does not implement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grpo_fsdp.algorithms.dpo import sequence_logps
from grpo_fsdp.data.preference import PreferenceSample
from grpo_fsdp.data.sft import SFTSample, collate
from grpo_fsdp.shared_prefix import SharedPrefix, pack


@dataclass
class PairLogps:
    """Summed log-probs and token counts of each pair's two completions, all [n]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


def pack_pairs(samples: Sequence[PreferenceSample], pad_id: int) -> SharedPrefix:
    """The shared-prefix layout of n pairs: completions 2i (chosen) and 2i+1 (rejected) answer prompt i."""
    completions = [ids for s in samples for ids in (s.chosen_ids, s.rejected_ids)]
    owner = [i for i in range(len(samples)) for _ in (0, 1)]
    return pack([s.prompt_ids for s in samples], completions, owner, pad_id)


def budget_micro_batches(rows: Sequence[int], tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Pack `rows` (indices into `tokens`, a pair's token count) into micro-batches of at most `budget` tokens:
    first fit, longest first; a pair longer than the budget goes alone. Deterministic (ties by index)."""
    bins: list[tuple[int, list[int]]] = []  # (tokens used, rows)
    for i in sorted(rows, key=lambda i: (-tokens[i], i)):
        for k, (used, members) in enumerate(bins):
            if used + tokens[i] <= budget:
                bins[k] = (used + tokens[i], [*members, i])
                break
        else:
            bins.append((tokens[i], [i]))
    return [members for _, members in bins]


def pad_pairs(samples: Sequence[PreferenceSample], pad_id: int) -> dict[str, torch.Tensor]:
    """2n right-padded rows: 2i = prompt i + chosen i, 2i+1 = prompt i + rejected i (input_ids, attention_mask, loss_mask)."""
    rows = [SFTSample(s.prompt_ids + c, [False] * len(s.prompt_ids) + [True] * len(c))
            for s in samples for c in (s.chosen_ids, s.rejected_ids)]
    return collate(rows, pad_id)


def layout_pairs(samples: Sequence[PreferenceSample], pad_id: int, shared_prefix: bool = True) -> SharedPrefix | dict:
    return pack_pairs(samples, pad_id) if shared_prefix else pad_pairs(samples, pad_id)


def processed_tokens(batch: SharedPrefix | dict) -> int:
    """Real (non-padding) tokens the network processes for this micro-batch."""
    return batch.real_tokens if isinstance(batch, SharedPrefix) else int(batch["attention_mask"].sum())


def pair_logps(model, batch: SharedPrefix | dict, device: torch.device) -> PairLogps:
    """Forward `model` (a Policy) over a `layout_pairs` micro-batch -> PairLogps (differentiable when grad is enabled)."""
    if isinstance(batch, SharedPrefix):
        sp = batch.to(device)
        mask = sp.completion_mask().to(device)  # [2n, C]
        logp, _ = model(shared_prefix=sp, target_mask=mask)  # [2n, C] fp32, 0 off-target
    else:
        b = {k: v.to(device) for k, v in batch.items()}
        mask = b["loss_mask"][:, 1:]  # [2n, L-1]: token t+1 scored from position t
        logp, _ = model(b["input_ids"], b["attention_mask"], mask)
    sums, counts = sequence_logps(logp, mask)  # [2n], [2n]
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])

