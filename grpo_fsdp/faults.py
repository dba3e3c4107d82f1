"""Fault injection for crash-safety tests: `GRPO_FSDP_FAULT=<point>[:<step>][:<action>][@<rank>]`.

The default action, `kill`, SIGKILLs the process there: a real kill (no cleanup handlers run) is
what a node failure or the OOM killer does; the tests use it to prove that checkpoints survive it.
`stop` SIGSTOPs it (a hung rank: alive, holding its sockets, answering nothing), and `user_error`
raises a `UserError` (a mistake found at run time, e.g. the evaluator's data missing on rank 1).
`@<rank>` limits the fault to one rank (`RANK`, 0 outside torchrun). Unset in normal runs, where
this costs one lookup. Example: `GRPO_FSDP_FAULT=after_step:2:stop@1`.
"""

from __future__ import annotations

import os
import signal

ACTIONS = ("kill", "stop", "user_error")


def maybe_fault(point: str, step: int | None = None) -> None:
    spec = os.environ.get("GRPO_FSDP_FAULT")
    if not spec:
        return
    spec, _, only_rank = spec.partition("@")
    name, _, rest = spec.partition(":")
    at, _, action = rest.partition(":")
    if action not in ("", *ACTIONS):
        raise ValueError(f"GRPO_FSDP_FAULT: unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
    rank = os.environ.get("RANK", "0")
    if name != point or (at and step is not None and int(at) != step) or (only_rank and only_rank != rank):
        return
    if action == "user_error":
        from grpo_fsdp.cli import UserError

        raise UserError(f"injected fault at {point} (step {step}): GRPO_FSDP_FAULT={os.environ['GRPO_FSDP_FAULT']}")
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
