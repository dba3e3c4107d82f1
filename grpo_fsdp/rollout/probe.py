"""The weight-sync probe: after each sync, the engine and the trainer must agree on a few fixed prompts.

A sync that silently misses a weight (a renamed parameter, a fused q/k/v that was half reloaded, a
stale prepacked LM head with tied embeddings) leaves the engine sampling from another policy: the
importance ratios are then wrong and nothing else notices. So after every sync both sides score
the same probe prompts (log-probs of every prompt token after the first, temperature 1) and the
run stops with `WeightSyncError` when they differ by more than `rollout.probe_tolerance`.

What "agree" can mean depends on precision: measured on CPU, fp32 engine vs fp32 trainer differ by
1e-6 to 3e-6; a bf16 engine differs from the trainer by about 0.02, so bf16 runs need a looser
tolerance (a broken sync moves log-probs by whole nats).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from grpo_fsdp.cli import UserError


class WeightSyncError(UserError):
    """The engine's log-probs of the probe prompts differ from the trainer's after a sync."""


@torch.no_grad()
def policy_prompt_logprobs(logprob_fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                           prompts: list[list[int]], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The trainer's side: log-probs (T = 1) of every prompt token after the first, [len(p) - 1] each.

    logprob_fn: `policy.Policy` (or anything with its forward signature: input_ids, attention_mask,
    target_mask -> ([B, L-1] log-probs, _)). Under FSDP2 this is a collective: every rank calls it.
    """
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # right padding, as the trainer pads
        ids[r, : len(p)], mask[r, : len(p)] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    logp, _ = logprob_fn(ids, mask, mask[:, 1:].bool())  # [B, L-1]
    return [logp[r, : len(p) - 1].float().cpu() for r, p in enumerate(prompts)]


def compare_logprobs(engine_lp: Sequence[torch.Tensor], trainer_lp: Sequence[torch.Tensor], tolerance: float) -> float:
    """Largest |engine - trainer| over all probe tokens, or `WeightSyncError` above `tolerance` (or NaN)."""
    worst, where = 0.0, (0, 0)
    for i, (a, b) in enumerate(zip(engine_lp, trainer_lp, strict=True)):
        diff = (a.float().cpu().reshape(-1) - b.detach().float().cpu().reshape(-1)).abs()
        if diff.isnan().any():
            worst, where = float("nan"), (i, int(diff.isnan().nonzero()[0]))
            break
        if diff.numel() and (d := float(diff.max())) > worst:
            worst, where = d, (i, int(diff.argmax()))
    if not worst <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"weights did not sync: engine and trainer log-probs of probe prompt {where[0]} differ by {worst:.3g} "
            f"at token {where[1] + 1} (tolerance {tolerance:g}); a weight name may be missing from the sync, "
            "or the engine kept a stale copy (tied embeddings). Raise rollout.probe_tolerance only for a "
            "lower-precision engine")
    return worst


def check_sync(engine, policy, prompts: list[list[int]], tolerance: float, device: torch.device | str = "cpu") -> float:
    """Score `prompts` on both sides (a collective on the trainer side) and compare; see the module docstring."""
    trainer = policy_prompt_logprobs(policy, prompts, device)
    return compare_logprobs(engine.prompt_logprobs(prompts), trainer, tolerance)
