"""The heartbeat thread cannot abort a clean exit (grpo_fsdp/peers.py).

A daemon thread that is inside a store call (GIL released in C++) when the interpreter finalizes is ended
by pthread_exit as it takes the GIL back; the forced unwind through a noexcept C++ frame aborts the
process: "terminate called without an active exception", exit 134, after a run that finished (seen in
about one suite run in three, on a loaded 2-core machine, where a store call can take a while). Here every
beat blocks in C++ for a second (a `wait` on a key nobody sets, as a slow store would): before the atexit
stop, 3 runs of 3 aborted; with it the process waits for the beat in flight and exits 0.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SCRIPT = """
import os, time
from datetime import timedelta
import torch.distributed as dist
from grpo_fsdp import peers

server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
os.environ.update(RANK="0", WORLD_SIZE="2")
client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=5))


class SlowStore:  # each call blocks in C++ with the GIL released
    calls = 0

    def add(self, key, n):
        SlowStore.calls += 1
        try:
            client.wait(["never-set"], timedelta(seconds=1))
        except RuntimeError:
            pass
        return 0


peers._state.update(store=SlowStore(), tried=True)
peers.start(timeout_s=30)
time.sleep(0.2)
assert SlowStore.calls == 1, SlowStore.calls
print("done", flush=True)
"""


def test_exit_waits_for_a_heartbeat_blocked_in_a_store_call():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert "terminate called" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done"
