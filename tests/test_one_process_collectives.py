"""One process runs no gloo collective for objects (distributed.all_gather_object / broadcast_object).

Why it matters: gloo copies a gathered payload above 32k elements with an OpenMP loop in its own thread; that
thread's OpenMP team makes libgomp count more threads than cores and throttle every team's spin-wait for the
rest of the process, so each later small op of the trainer waits for a sleeping worker (the default GRPO preset's
rollouts ran ~2x slower from step 2 on). The visible trace is the extra OpenMP worker thread, counted here in a
fresh process with two OpenMP threads (the default of a 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, os, torch, torch.distributed as dist
from grpo_fsdp import distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.ones(1 << 16).add_(1)  # the main thread's OpenMP team exists before the count
threads = lambda: len(os.listdir("/proc/self/task"))
payload = [list(range(200_000))]
before = threads()
gathered = distributed.all_gather_object(payload)
sent = distributed.broadcast_object(payload)
after_ours = threads()
parts = [None]
dist.all_gather_object(parts, payload)  # the raw collective, for contrast
after_raw = threads()
dist.destroy_process_group()
print(json.dumps({"same": gathered == [payload] and sent == payload, "before": before, "after_ours": after_ours,
                  "after_raw": after_raw}))
"""


def test_one_process_gathers_without_a_collective(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PORT": str(29_000 + os.getpid() % 1000)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["same"]
    assert r["after_ours"] == r["before"]  # no thread started by gloo: no second OpenMP team
    assert r["after_raw"] >= r["after_ours"]  # (torch 2.13: +1, gloo's thread's OpenMP worker; informative only)


def test_object_collectives_go_through_distributed_py():
    """A raw object collective elsewhere would bring the throttling back in one process: they live in distributed.py
    (and logging.py's gather, which returns early in one process)."""
    package = Path(__file__).resolve().parents[1] / "grpo_fsdp"
    raw = re.compile(r"\bdist\.(all_gather_object|broadcast_object_list|gather_object|scatter_object_list)\(")
    found = {str(p.relative_to(package)) for p in package.rglob("*.py") if raw.search(p.read_text())}
    assert found == {"distributed.py", "logging.py"}, found
