"""A recipe's teardown: one ExitStack that releases in a fixed order, whatever order things were built in.

    engine -> reward workers -> logger -> process group

The order is forced by what each release needs: vLLM's shutdown touches torch.distributed's default
group, so the engine goes while the group still exists; the logger's clean close is a collective
(the last eval rows reach rank 0), so it too goes before the group; the reward workers have no
dependency and go before the logger so that a stuck worker cannot keep the W&B run open. A recipe
builds the reward workers first (they import their grader while the models load) and the logger last
(it needs the resumed step), so plain LIFO order would be wrong: each resource enters its slot, and
the slots are nested stacks entered in reverse order inside the one outer stack.

On an exception the same order runs, each release sees the exception (the logger then closes
locally, without its collective), and a release that fails as well is reduced to one warning line:
the error the user must see is the first one, not a second traceback from teardown.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager

ORDER = ("engine", "rewards", "logger", "process_group")  # released first to last


@contextmanager
def _released(slot: str, obj):
    """Yield `obj`; release it on the way out: its `__exit__` if it has one, else `close()`, else call it."""

    def release(exc: BaseException | None) -> None:
        if hasattr(obj, "__exit__"):
            obj.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
        elif hasattr(obj, "close"):
            obj.close()
        else:
            obj()

    try:
        yield obj
    except BaseException as exc:
        try:
            release(exc)
        except Exception as e:  # noqa: BLE001 -- any failure here is secondary: keep the first error, one line for this
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: releasing the {slot} after an error failed too: {first}", file=sys.stderr, flush=True)
        raise
    release(None)


class Teardown(ExitStack):
    """`with Teardown() as td: td.add("engine", engine)`; `td.callback(f)` for anything else (released first)."""

    def __enter__(self) -> Teardown:  # noqa: PYI034 (typing.Self needs Python 3.11)
        super().__enter__()
        self._slots = {slot: self.enter_context(ExitStack()) for slot in reversed(ORDER)}
        return self

    def add(self, slot: str, obj):
        """Put `obj` (a context manager, an object with `close()`, or a function to call) into `slot`; returns it."""
        if slot not in self._slots:
            raise ValueError(f"Teardown: unknown slot {slot!r}; choose one of {', '.join(ORDER)}")
        return self._slots[slot].enter_context(_released(slot, obj))
