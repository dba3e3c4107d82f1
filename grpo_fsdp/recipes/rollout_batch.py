"""The GRPO step's rollout, gathered over ranks, and how it is cut into optimizer steps and micro-batches.

Layout, which makes a step independent of the number of ranks and of the micro-batch size:

    prompts    the step's P prompts in a global order; rank r generates positions
               [r*P/W, (r+1)*P/W), each with key = its global position (so its samples do not
               depend on which rank drew it, see `rollout.noise`)
    rollout    every rank's completions, all-gathered: P*G completions, prompt-major
               (completion i answers prompt position i // G), identical on every rank
    opt steps  optimizer step c trains on global completions [c*S, (c+1)*S), S = global batch
    ranks      within it, rank r takes the contiguous share [c*S + r*S/W, c*S + (r+1)*S/W),
               cut into micro-batches of train.micro_batch_size

So a 1-process run and a W-process run put the same completions in each optimizer step, and the
loss divided by all-reduced counts (algorithms/grpo.py) gives the same gradient. The gather moves
token ids only (a few hundred KB per step), far less than one weight sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_fsdp.algorithms.grpo import mask_truncated
from grpo_fsdp.data.sft import SFTSample, collate
from grpo_fsdp.distributed import all_gather_object
from grpo_fsdp.rollout.base import Completion
from grpo_fsdp.shared_prefix import pack


@dataclass
class Rollout:
    """One step's completions over all ranks, prompt-major."""

    prompts: list[list[int]]  # [P] token ids of each prompt position
    tokens: list[list[int]]  # [P*G] completion token ids
    truncated: torch.Tensor  # [P*G] bool: cut at max_new_tokens
    rewards: torch.Tensor  # [P*G] float32
    group_size: int
    logprobs: list[list[float]] | None = None  # [P*G] the engine's log-prob of each completion token (Completion.logprobs)

    def prompt_of(self, i: int) -> list[int]:
        return self.prompts[i // self.group_size]


def gather_rollout(local: list[Completion], rewards: list[float], prompts: list[list[int]], group_size: int) -> Rollout:
    """Every rank's completions and rewards, in rank order (= prompt order): the global rollout.

    `prompts` are the step's P prompts (global order, known on every rank); `local` are this
    rank's completions of its contiguous slice of them, prompt-major.
    """
    mine = [(c.token_ids, c.finish_reason == "length", r, list(c.logprobs)) for c, r in zip(local, rewards)]
    if any(len(t) != len(lp) for t, _, _, lp in mine):
        raise RuntimeError("the rollout engine returned a completion whose log-probs do not match its tokens one to one")
    parts = all_gather_object(mine)  # token ids and log-probs are plain lists: a few hundred KB per step
    rows = [row for part in parts for row in part]
    if len(rows) != len(prompts) * group_size:
        raise RuntimeError(f"rollout has {len(rows)} completions, expected {len(prompts)} prompts x {group_size}")
    return Rollout(
        prompts=prompts,
        tokens=[t for t, _, _, _ in rows],
        truncated=torch.tensor([cut for _, cut, _, _ in rows], dtype=torch.bool),
        rewards=torch.tensor([r for _, _, r, _ in rows], dtype=torch.float32),
        group_size=group_size,
        logprobs=[lp for _, _, _, lp in rows],
    )


def rank_share(step_index: int, global_batch: int, rank: int, world: int) -> range:
    """Global completion indices that `rank` trains on in optimizer step `step_index` of the rollout."""
    per_rank = global_batch // world
    start = step_index * global_batch + rank * per_rank
    return range(start, start + per_rank)


def micro_batches(
    rollout: Rollout,
    advantages: torch.Tensor,  # [P*G]
    keep: torch.Tensor,  # [P*G] bool: False drops a completion from the loss (zero-variance filter)
    indices: range,
    micro_batch_size: int,
    pad_id: int,
    drop_truncated: bool,
    shared_prefix: bool = True,
) -> list[dict]:
    """The micro-batches of `indices`, loss on completion tokens only.

    Each dict: inputs (the policy's keyword arguments, `to_device` moves them); target_mask; adv [n];
    index [n] (global completion index); tokens (tokens the network processes); engine_logp, laid out
    like target_mask (0 elsewhere), the engine's log-prob of each completion token (None when the
    rollout has none).
      shared_prefix  inputs = {"shared_prefix": SharedPrefix}: each prompt once, then its completions
                     (`grpo_fsdp/shared_prefix.py`); target_mask [n, C] over completion tokens
      padded         inputs = {input_ids, attention_mask} [n, L], prompt + completion rows;
                     target_mask [n, L-1] (token t+1 is scored from tokens <= t)
    """
    out = []
    for lo in range(indices.start, indices.stop, micro_batch_size):
        idx = list(range(lo, min(lo + micro_batch_size, indices.stop)))
        if shared_prefix:
            runs = list(dict.fromkeys(i // rollout.group_size for i in idx))  # prompt positions, in order
            sp = pack([rollout.prompts[p] for p in runs], [rollout.tokens[i] for i in idx],
                      [runs.index(i // rollout.group_size) for i in idx], pad_id)
            inputs, target, tokens = {"shared_prefix": sp}, sp.completion_mask() & keep[idx][:, None], sp.real_tokens
            starts = [0] * len(idx)  # completion token t sits in column t
        else:
            samples = [SFTSample(rollout.prompt_of(i) + rollout.tokens[i],
                                 [False] * len(rollout.prompt_of(i)) + [bool(keep[i])] * len(rollout.tokens[i])) for i in idx]
            b = collate(samples, pad_id)
            target = b.pop("loss_mask")[:, 1:]
            inputs, tokens = b, int(b["attention_mask"].sum())
            starts = [len(rollout.prompt_of(i)) - 1 for i in idx]  # token t is scored in column len(prompt) - 1 + t
        if drop_truncated:  # DAPO overlong filtering
            target = mask_truncated(target, rollout.truncated[idx])
        out.append({"inputs": inputs, "target_mask": target, "adv": advantages[idx].float(), "index": torch.tensor(idx),
                    "tokens": tokens, "engine_logp": _engine_logp(rollout, idx, starts, target.shape)})
    return out


def _engine_logp(rollout: Rollout, idx: list[int], starts: list[int], shape: torch.Size) -> torch.Tensor | None:
    """The engine's log-probs of completions `idx`, row n's token t in column starts[n] + t of a [n, T] tensor."""
    if rollout.logprobs is None:
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for row, (i, start) in enumerate(zip(idx, starts)):
        lp = rollout.logprobs[i]
        out[row, start:start + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out


def to_device(inputs: dict, device) -> dict:
    """A micro-batch's `inputs` on `device` (tensors and `SharedPrefix` both have `.to`)."""
    return {k: v.to(device) for k, v in inputs.items()}
