"""SIGTERM (Slurm preemption, `scancel`, a spot reclaim) turns into a flag the loop checks.

The handler only records the signal; the loop agrees on it across ranks at the next step boundary
(`distributed.any_rank`), saves a checkpoint and exits 0, so a requeued job resumes with
`checkpoint.resume=auto`.
"""

from __future__ import annotations

import signal


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
