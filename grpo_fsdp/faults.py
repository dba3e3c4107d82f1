"""Fault injection for crash-safety tests: `GRPO_FSDP_FAULT=<point>[:<step>]` SIGKILLs the process there.

A real kill (no cleanup handlers run) is what a node failure or the OOM killer does; the tests
use it to prove that checkpoints survive it. Unset in normal runs, where this costs one lookup.
"""

from __future__ import annotations

import os
import signal


def maybe_fault(point: str, step: int | None = None) -> None:
    spec = os.environ.get("GRPO_FSDP_FAULT")
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and (not at or step is None or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)
