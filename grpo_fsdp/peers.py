"""What one rank can learn about the others when a run fails: heartbeats and the one-line report.

Both go through torchrun's rendezvous store, never through a collective (a collective would wait
on the very peer that failed). torchrun's agent hosts that store, so it outlives every worker and
still answers while the process group is broken; we open our own client connection to it.

- Heartbeat (`start`): a daemon thread adds 1 to `hb/<rank>` every second until the process exits,
  through teardown too, so a rank tearing down after the same failure still counts as answering. An
  atexit handler stops and joins it before the interpreter finalizes: a daemon thread still inside
  `store.add` then (the GIL released in C++) is ended by pthread_exit when it takes the GIL back, and that
  forced unwind through a noexcept C++ frame aborts the process ("terminate called without an active
  exception", exit 134 after a clean run; seen in about one suite run in three on a loaded 2-core machine,
  and every time when a beat blocks at exit: tests/test_peers_exit.py).
  A rank whose counter stands still for a few seconds is stopped (SIGSTOP), hung in C code, or dead.
- Report (`report`): a failing rank publishes its line under `error/<rank>` and waits up to two
  seconds for the others. It prints only if no lower rank published the same text; the prefix names
  the ranks that said it, and is left out when every rank did (as in a one-process run).
- A failed collective (`explain_collective_failure`) stays silent when another rank has published
  the cause (`cause/<rank>`: its own error or crash, printed by that rank); otherwise it names the
  ranks whose heartbeat stopped.
- With NCCL the watchdog ends a waiting rank from C++ and the main thread never reports, so each
  rank also watches the next one (`PeerWatch`) and names it just before the timeout runs out.

Without torchrun's agent store (one process, or a launcher whose store lives in rank 0) every
rank prints its own line with its prefix: never a hang, at worst a duplicate.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from datetime import timedelta

HEARTBEAT_S = 1.0  # beat period
PROBE_S = 3.0  # how long a counter must stand still to call a rank silent (3 beats)
GATHER_S = 2.0  # how long a failing rank waits for the others' messages before it prints
STORE_ERRORS = (RuntimeError, OSError, ValueError)  # torch.distributed.DistError is a RuntimeError
STORE_TIMEOUT_S = 5.0  # our client's timeout: the longest one store call can block

_state: dict = {"store": None, "tried": False, "timeout_s": None, "beating": False}


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _store():
    """A client of the launcher's store, namespaced by torchrun's restart count (None where there is none)."""
    if _state["store"] is None and not _state["tried"]:
        _state["tried"] = True
        import torch.distributed as dist

        # before the process group exists only torchrun's agent hosts a store (elsewhere rank 0 does, in init)
        hosted = dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if _rank_world()[1] > 1 and hosted and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            with contextlib.suppress(*STORE_ERRORS):  # no store to reach (rank 0 gone, not torchrun): report without it
                base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                     timeout=timedelta(seconds=STORE_TIMEOUT_S))
                _state["store"] = dist.PrefixStore(f"grpo_fsdp/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
    return _state["store"]


class PeerWatch:
    """Rank r watches rank r+1's counter (a ring: one line per silent rank, store traffic O(world)).
    Used with NCCL, whose watchdog ends a waiting rank after the timeout from a C++ thread, so that the
    main thread never gets to say which rank it waited for: this says it just before the watchdog acts."""

    def __init__(self, peer: int, limit_s: float, now: float):
        self.peer, self.limit_s, self.count, self.since, self.told = peer, limit_s, None, now, False

    def silent_for(self, count: int, now: float) -> float | None:
        """Seconds the peer has been silent, once, when that reaches the limit; else None."""
        if count != self.count:
            self.count, self.since = count, now
        elif not self.told and now - self.since >= self.limit_s:
            self.told = True
            return now - self.since
        return None


def start(timeout_s: float, watch: bool = False) -> None:
    """Call once the process group is up: remember the collective timeout and start beating (and, with
    `watch`, report the next rank when it has been silent almost as long as a collective may wait)."""
    _state["timeout_s"] = timeout_s
    store = _store()
    if store is None or _state["beating"]:
        return
    rank, world = _rank_world()
    peer = PeerWatch((rank + 1) % world, max(PROBE_S, timeout_s - 2 * HEARTBEAT_S), time.monotonic())

    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                store.add(f"hb/{rank}", 1)
                if watch and (silent := peer.silent_for(int(store.add(f"hb/{peer.peer}", 0)), time.monotonic())):
                    line = report(f"rank {peer.peer} stopped answering {silent:.0f} s ago (stopped, hung or killed without "
                                  f"a message); a collective that waits for it ends the run at "
                                  f"hardware.collective_timeout_s={timeout_s:g}")
                    if line:
                        print(line, file=sys.stderr, flush=True)
            except STORE_ERRORS:
                return  # the store is gone: the launcher is ending the run
            stop.wait(HEARTBEAT_S)

    _state["beating"] = True
    thread = threading.Thread(target=beat, name="grpo-fsdp-heartbeat", daemon=True)
    thread.start()
    atexit.register(_stop_beating, stop, thread)


def _stop_beating(stop: threading.Event, thread: threading.Thread) -> None:
    """At exit, before finalization: let the beat in flight return (at most one store call's timeout)."""
    stop.set()
    thread.join(timeout=STORE_TIMEOUT_S + 1.0)


def _published(store, kind: str, ranks) -> dict[int, str]:
    keys = {r: f"{kind}/{r}" for r in ranks}
    return {r: store.get(k).decode() for r, k in keys.items() if store.check([k])}


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def publish_cause(text: str) -> None:
    """Say that this rank failed for a reason it prints itself, so that peers whose collective then
    breaks stay silent instead of adding a second, misleading line."""
    store = _store()
    if store is not None:
        with contextlib.suppress(*STORE_ERRORS):
            store.set(f"cause/{_rank_world()[0]}", text)


def report(text: str) -> str | None:
    """The line this rank prints for `text`, or None when a lower rank prints the same text."""
    rank, world = _rank_world()
    store = _store()
    if world == 1:
        return f"error: {text}"
    if store is None:
        return f"[rank {rank}] error: {text}"
    try:
        store.set(f"error/{rank}", text)
        deadline = time.monotonic() + GATHER_S
        while len(said := _published(store, "error", range(world))) < world and time.monotonic() < deadline:
            time.sleep(0.1)
    except STORE_ERRORS:
        return f"[rank {rank}] error: {text}"
    return line_for(text, rank, world, said)


def line_for(text: str, rank: int, world: int, said: dict[int, str]) -> str | None:
    """What `rank` prints for `text`, given the texts the ranks published (`said`, its own included):
    nothing when a lower rank said the same; no prefix when every rank did; else the ranks that did."""
    same = sorted({rank} | {r for r, t in said.items() if t == text})
    if same[0] < rank:
        return None
    return f"error: {text}" if len(same) == world else f"[{_ranks(same)}] error: {text}"


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo raises a plain RuntimeError, newer paths DistError)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and any(s in msg for s in ("gloo", "Connection closed by peer", "Timed out waiting",
                                                                    "NCCL", "Connection reset by peer"))


def explain_collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed here, or None when another rank has published the cause."""
    rank, world = _rank_world()
    timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
    timeout = _state["timeout_s"]
    bound = f"hardware.collective_timeout_s={timeout:g}" if timeout else "hardware.collective_timeout_s"
    store = _store()
    if store is None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return report(f"a collective failed ({first}); see the other ranks' output")
    peers = [r for r in range(world) if r != rank]
    try:
        counts = {r: int(store.add(f"hb/{r}", 0)) for r in peers}
        moved: set[int] = set()
        deadline = time.monotonic() + PROBE_S
        while time.monotonic() < deadline and len(moved) < len(peers):
            if _published(store, "cause", peers):
                return None  # that rank prints why
            time.sleep(0.2)
            moved |= {r for r in peers if r not in moved and int(store.add(f"hb/{r}", 0)) != counts[r]}
        if _published(store, "cause", peers):
            return None
    except STORE_ERRORS:
        return report(f"a collective failed and the launcher's store is gone: {str(exc).strip()[:200]}")
    silent = sorted(set(peers) - moved)
    waited = f" after {timeout:g} s" if timeout else ""
    if silent and timed_out:
        return report(f"a collective timed out{waited} waiting for {_ranks(silent)}, which stopped answering "
                      f"(stopped, hung or killed without a message); {bound} bounds this wait")
    if silent:
        return report(f"lost {_ranks(silent)} during a collective: it stopped answering (killed or crashed without a "
                      "message; see its output above and the launcher's exit report)")
    if timed_out:
        return report(f"a collective timed out{waited} while every rank still answers: one was busy for longer "
                      f"(evaluation between steps counts); raise {bound}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return report(f"a collective failed while every rank still answers: {first[:200]}")
