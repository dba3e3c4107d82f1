"""Two torchrun ranks (gloo, CPU) write ONE W&B run, offline: rank 0's training metrics, rank 1's eval
metrics at training step 2, both ranks' system metrics, all under one run id, read back from the
`.wandb` transaction logs themselves. metrics.jsonl, rank 0's file, receives rank 1's rows too.
The ranks inherit a WANDB_SERVICE from this process, as under a launcher that set W&B up.

The reader below follows the `.wandb` format of wandb 0.31 (leveldb-log framing): a 7-byte file
header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32C, length uint16, type: 1 full, 2 first, 3 middle, 4 last); a record is a serialized
`wandb_internal_pb2.Record`, split across chunks when it does not fit the block.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from conftest import REPO, _env, read_metrics

pytestmark = pytest.mark.distributed
BLOCK, CHUNK_HEADER = 32768, 7
SCRIPT = REPO / "tests" / "helpers" / "shared_run_script.py"


def read_records(path):
    """Every protobuf Record in one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"not a wandb 0.31 transaction log: {data[:7]!r}"
    pos, parts, records = 7, [], []
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        parts.append(data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (1, 4):  # full or last: a record is complete
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def history_rows(records):
    """The logged rows of one file as dicts (values decoded from JSON)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item})
    return rows


def test_two_ranks_write_one_offline_run(tmp_path):
    wandb = pytest.importorskip("wandb")

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(run_dir),
    ]
    # A parent that set W&B up (this pytest process, a notebook, an agent) leaves WANDB_SERVICE in the
    # environment the ranks inherit; two writers of one run id cannot share that service.
    wandb.setup()
    try:
        env = _env({"WANDB_MODE": "offline"})
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        wandb.teardown()
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"

    # One run id: decided by rank 0, held by both loggers, in both transaction logs.
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert json.loads((run_dir / "ids.json").read_text()) == [run_id, run_id]
    rank0_dirs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    rank1_dirs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}-rank1"))
    assert len(rank0_dirs) == 1 and len(rank1_dirs) == 1
    files = {rank: d[0] / f"run-{run_id}.wandb" for rank, d in ((0, rank0_dirs), (1, rank1_dirs))}
    records = {rank: read_records(path) for rank, path in files.items()}
    for rank in (0, 1):
        (run,) = [r.run for r in records[rank] if r.WhichOneof("record_type") == "run"]
        assert run.run_id == run_id and run.display_name == "shared"
        # Same config from both ranks: the later file, synced as a resumption, must not blank it.
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["model"] == {"name": "tiny"} and config["world_size"] == 2
        # train/step is every namespace's x-axis, in both files.
        metrics = {
            (m.metric.glob_name, m.metric.step_metric) for m in records[rank] if m.WhichOneof("record_type") == "metric"
        }
        assert {("eval/*", "train/step"), ("system/*", "train/step"), ("train/*", "train/step")} <= metrics
    # `wandb sync` uploads the files in start-time order, each later one appended: rank 0's first.
    start = {
        rank: next(r.run.start_time.ToNanoseconds() for r in records[rank] if r.WhichOneof("record_type") == "run")
        for rank in (0, 1)
    }
    assert start[0] < start[1]

    # Rank 0: the training rows, at W&B step = training step, with its own system metrics only.
    rows0 = history_rows(records[0])
    assert [(r["_step"], r["train/step"], r["train/loss"], r["train/lr"]) for r in rows0] == [
        (1, 1, 1.0, 0.1),
        (2, 2, 0.5, 0.2),
        (3, 3, 1.0 / 3.0, 0.1 * 3),
    ]
    assert all(r["system/rank0/rss_gib"] > 0 for r in rows0)
    assert not any(k.startswith(("eval/", "system/rank1/")) for r in rows0 for k in r)

    # Rank 1: no training keys; its eval row sits at training step 2; its system metrics every step.
    rows1 = history_rows(records[1])
    assert not any(k.startswith(("train/loss", "train/lr", "system/rank0/")) for r in rows1 for k in r)
    (eval_row,) = [r for r in rows1 if "eval/arith/accuracy" in r]
    assert (eval_row["train/step"], eval_row["eval/arith/accuracy"], eval_row["eval/arith/count"]) == (2, 0.625, 16)
    assert sorted(r["train/step"] for r in rows1 if "system/rank1/rss_gib" in r) == [1, 2, 3]

    # metrics.jsonl: one line per step with both ranks' system metrics; the eval line of step 2
    # arrives with step 3's log and is written just before it.
    lines = read_metrics(run_dir)
    assert [(r["step"], r.get("train/loss"), r.get("eval/arith/accuracy")) for r in lines] == [
        (1, 1.0, None),
        (2, 0.5, None),
        (2, None, 0.625),
        (3, 1.0 / 3.0, None),
    ]
    assert lines[2] == {"step": 2, "eval/arith/accuracy": 0.625, "eval/arith/count": 16}
    for line in (lines[0], lines[1], lines[3]):
        assert line["system/rank0/rss_gib"] > 0 and line["system/rank1/rss_gib"] > 0


@pytest.mark.slow  # 40 s; one shared run from two ranks is test_two_ranks_write_one_offline_run, rank-1 eval under GRPO
# is test_curriculum.py::test_grpo_walks_the_curriculum_and_keeps_best_and_latest
def test_grpo_run_with_evaluation_writes_one_offline_run(tmp_path):
    """The GRPO recipe itself under torchrun: rank 0's training metrics, rank 1's eval metrics (it
    evaluates at steps 1 and 2) and both ranks' system metrics, under one run id."""
    wandb = pytest.importorskip("wandb")
    from conftest import SMALL, run_train

    run_dir = tmp_path / "grpo"
    wandb.setup()
    try:
        run_train([*SMALL, "algo=grpo", "algo.reward_workers=1", f"run_dir={run_dir}", "train.max_steps=2",
                   "algo.prompts_per_step=4", "algo.group_size=2", "train.global_batch_size=4", "train.micro_batch_size=2",
                   "algo.max_new_tokens=8", "optim.warmup_steps=0", "eval.tasks=[arithmetic]", "eval.limit=6",
                   "eval.every_steps=1", "eval.max_new_tokens=8", "logging.wandb=true"], nproc=2)
    finally:
        wandb.teardown()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (rank0,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    (rank1,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}-rank1/run-{run_id}.wandb")
    rows0, rows1 = history_rows(read_records(rank0)), history_rows(read_records(rank1))
    assert [r["train/step"] for r in rows0] == [1, 2]
    assert all("train/loss" in r and "reward/mean" in r and r["system/rank0/rss_gib"] > 0 for r in rows0)
    evals = [r for r in rows1 if "eval/arithmetic/accuracy" in r]
    assert [r["train/step"] for r in evals] == [1, 2]
    assert all(0 <= r["eval/arithmetic/accuracy"] <= 1 and r["eval/arithmetic/mean_length"] <= 8 for r in evals)
    # the samples table (problem, prediction, gold, correct) of each evaluation, a W&B table file
    tables = [r for r in rows1 if r.get("eval/arithmetic/samples/_type") == "table-file"]
    assert [(t["eval/arithmetic/samples/nrows"], t["eval/arithmetic/samples/ncols"]) for t in tables] == [(6, 4), (6, 4)]
    assert sorted(r["train/step"] for r in rows1 if "system/rank1/rss_gib" in r) == [1, 2]
    assert not any(k.startswith("train/loss") for r in rows1 for k in r)
    # metrics.jsonl gets rank 1's eval rows from rank 0, at the step they evaluated
    assert [(r["step"], "eval/arithmetic/accuracy" in r) for r in read_metrics(run_dir)] == [(1, False), (1, True), (2, False), (2, True)]
