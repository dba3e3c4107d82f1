"""Checkpoints: bit-identical resume, crash safety, SIGTERM, and the Hugging Face export."""

import json
import shlex
import signal
import time

import pytest
import torch
from conftest import SMALL, read_metrics, run_train, start_train
from safetensors.torch import load_file

from grpo_fsdp.checkpoint import verify

N = 3  # steps before the kill; the straight run does 2N


def _weights(hf_dir):
    return load_file(str(hf_dir / "model.safetensors"))


def test_resume_after_kill_is_bit_identical(tmp_path):
    common = [*SMALL, f"train.max_steps={2 * N}", "checkpoint.every_steps=1", "checkpoint.export_hf=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train([*common, f"run_dir={straight}"])
    # N steps, then SIGKILL right after step N's checkpoint (a real kill: no handler runs) ...
    killed = run_train([*common, f"run_dir={resumed}"], env={"GRPO_FSDP_FAULT": f"after_step:{N}"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, N + 1))
    # ... then resume=auto and N more
    run_train([*common, f"run_dir={resumed}", "checkpoint.resume=auto"])
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 2 * N + 1))
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]  # exact, not approximate
    assert [r["train/grad_norm"] for r in a] == [r["train/grad_norm"] for r in b]
    wa, wb = _weights(straight / "hf"), _weights(resumed / "hf")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], _weights_init(tmp_path)[k]) for k in wa)


def _weights_init(tmp_path):
    run_dir = tmp_path / "init"
    if not (run_dir / "hf").exists():
        run_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=1", "optim.lr=1e-30", "checkpoint.export_hf=true"])
    return _weights(run_dir / "hf")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    from grpo_fsdp.checkpoint import Checkpointer
    from grpo_fsdp.export import export_checkpoint

    run_dir = tmp_path / "run"
    proc = run_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=4", "checkpoint.every_steps=2"],
                     env={"GRPO_FSDP_FAULT": "during_checkpoint_write:4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    root = run_dir / "checkpoints"
    assert (root / "step_000004.partial").is_dir()  # the torn write is there ...
    assert not (root / "step_000004.partial" / "COMPLETE").exists()
    assert Checkpointer(root, 2).latest() == root / "step_000002"  # ... and ignored
    out = export_checkpoint(root / "step_000002", tmp_path / "hf2")  # the previous one loads
    assert (out / "model.safetensors").is_file()
    # resuming picks step 2, redoes steps 3-4, and the stale partial directory is cleaned up
    run_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.resume=auto"])
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_000002", "step_000004"]


def test_sigterm_saves_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=100000"])
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last = read_metrics(run_dir)[-1]["step"]
    ckpt = run_dir / "checkpoints" / f"step_{last:06d}"
    assert (ckpt / "COMPLETE").exists(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == last
    assert verify(ckpt) is None  # its manifest matches
    # the message names the command that resumes: the same overrides, resume and run_dir pinned (issue 11, item 3)
    resume = shlex.join([*SMALL, "train.max_steps=100000", "checkpoint.resume=auto", f"run_dir={run_dir}"])
    assert f"SIGTERM: saved checkpoint at step {last} in {ckpt}; exiting with code 0. " \
           f"Resume with: python -m grpo_fsdp.train {resume}\n" in out


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo_fsdp.export import export_checkpoint

    run_dir = tmp_path / "run"
    run_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=3", "checkpoint.export_hf=true"])
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32)
    by_command = AutoModelForCausalLM.from_pretrained(export_checkpoint(run_dir / "checkpoints" / "step_000003", tmp_path / "cmd"))
    # independent path: the DCP shards read straight into a fresh model
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir / "hf"), dtype=torch.float32)
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=str(run_dir / "checkpoints" / "step_000003"), no_dist=True)
    fresh.load_state_dict(state["model"])
    ids = torch.tensor([[257, 117, 115, 101, 114, 10, 49, 43, 50]])
    with torch.no_grad():
        ref = fresh(ids).logits
        assert torch.equal(exported(ids).logits, ref)
        assert torch.equal(by_command(ids).logits, ref)
    # and training changed the weights away from a fresh seeded init
    assert not torch.allclose(ref, AutoModelForCausalLM.from_config(fresh.config)(ids).logits, atol=1e-3)


def test_metadata_unpickler_rejects_foreign_classes(tmp_path):
    import pickle

    from grpo_fsdp.checkpoint import SafeFileSystemReader

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_save_final_false_keeps_periodic_checkpoints_only(tmp_path):
    """checkpoint.save_final=false (benchmarks): step 2 of 3 is saved by every_steps=2, the end is not."""
    run_dir = tmp_path / "run"
    run_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=3", "checkpoint.every_steps=2", "checkpoint.save_final=false",
               "checkpoint.export_hf=false"])
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", "step_000002"]
