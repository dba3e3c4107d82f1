"""One process vs `torchrun --nproc_per_node=2` (gloo) on the same global batch: same per-step
losses and gradient norms, also with another micro-batch size. This holds because the loss is
divided by the all-reduced target-token count and FSDP sums (not averages) gradients. One process runs
unsharded (parallelize.shards), so this compares that path with FSDP2, and its checkpoint resumes on 2 ranks."""

import pytest
from conftest import SMALL, read_metrics, run_train

pytestmark = pytest.mark.distributed
STEPS = 4


def _run(tmp_path, name, nproc, micro, *extra):
    run_dir = tmp_path / name
    run_train([*SMALL, f"run_dir={run_dir}", f"train.max_steps={STEPS}", f"train.micro_batch_size={micro}", *extra],
              nproc=nproc)
    return read_metrics(run_dir)


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_world_size_and_micro_batch_do_not_change_the_step(tmp_path):
    # 2 ranks at micro-batch 1 against 1 process at 4: both changes in one run (each 2-rank run costs ~40 s here;
    # 2 ranks at micro-batch 4 also starts from the 1-process checkpoint below)
    single = _run(tmp_path, "np1_mb4", 1, 4, "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    double_small = _run(tmp_path, "np2_mb1", 2, 1)
    assert len(single) == len(double_small) == STEPS
    for a, c in zip(single, double_small):
        assert a["train/target_tokens"] == c["train/target_tokens"]
        for key in ("train/loss", "train/grad_norm"):
            assert _close(a[key], c[key]), (key, a[key], c[key])
    # the runs learned something (identical but frozen runs would also agree)
    assert single[-1]["train/loss"] < single[0]["train/loss"] - 0.3
    # one process (plain parameters, parallelize.shards) writes the checkpoint that 2 FSDP2 ranks resume from
    resumed = _run(tmp_path, "np2_resumed", 2, 4, f"checkpoint.resume={tmp_path / 'np1_mb4' / 'checkpoints' / 'step_000002'}")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(single[2:], resumed, strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert _close(a[key], b[key]), (key, a[key], b[key])
