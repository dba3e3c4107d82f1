"""`best/` follows checkpoint.best_metric, and `latest.json` is never torn (issue 16, item 3).

The Checkpointer runs here in-process on a one-rank gloo group with a tiny nn.Linear, so these
tests take about a second; the recipe wiring is covered by tests/test_grpo_recipe.py-style runs.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from grpo_fsdp import best_checkpoint as bc
from grpo_fsdp import checkpoint as ck


class _Saves:
    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write("{}")


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _parts():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _run(cp: ck.Checkpointer, evals: dict[int, float], steps: int, every: int = 0):
    """A run's checkpoint section: weights set to the step number, eval at the steps in `evals`."""
    model, opt, sched = _parts()
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(step)
        metrics = {"eval/gsm8k/accuracy": evals[step]} if step in evals else {}
        improved = cp.observe(step, metrics, scheduled=step in evals)
        if improved or (every and step % every == 0) or step == steps:
            cp.save(step, model, opt, sched, step, _Saves(), _Saves())
    return model, opt, sched


def test_best_follows_the_metric_up_then_down(group, tmp_path):
    root = tmp_path / "checkpoints"
    cp = ck.Checkpointer(root, keep_last=1, best_metric="eval/gsm8k/accuracy", best_mode="max")
    _run(cp, {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.45}, steps=8, every=2)
    info = json.loads((root / "best" / "BEST.json").read_text())
    assert info == {"metric": "eval/gsm8k/accuracy", "mode": "max", "value": 0.5, "step": 4}
    assert [p.name for p in cp.complete()] == ["step_000008"]  # keep_last=1 pruned step 4, not best/
    assert ck.verify(root / "best") is None  # a complete, verified checkpoint
    model, opt, sched = _parts()
    step, _ = cp.resume(str(root / "best"), model, opt, sched)  # loads like any step directory
    assert step == 4 and torch.all(model.weight == 4)
    # resume=auto ignores best/: the newest step directory
    model, opt, sched = _parts()
    step, _ = ck.Checkpointer(root, 1).resume("auto", model, opt, sched)
    assert step == 8 and torch.all(model.weight == 8)


def test_min_mode_and_resumed_run_compete_with_earlier_best(group, tmp_path):
    root = tmp_path / "checkpoints"
    _run(ck.Checkpointer(root, 2, "eval/gsm8k/accuracy", "min"), {1: 0.5, 2: 0.2, 3: 0.6}, steps=3)
    assert json.loads((root / "best" / "BEST.json").read_text())["step"] == 2
    # a second part of the run (a resume): 0.3 is not below the stored 0.2, 0.1 is
    cp = ck.Checkpointer(root, 2, "eval/gsm8k/accuracy", "min")
    assert not cp.observe(4, {"eval/gsm8k/accuracy": 0.3}, True)
    assert cp.observe(5, {"eval/gsm8k/accuracy": 0.1}, True)
    assert not cp.observe(6, {}, False)  # no eval scheduled: no collective, no change


def test_a_metric_the_evaluation_does_not_log_warns_once(group, tmp_path, capsys):
    cp = ck.Checkpointer(tmp_path, 2, "eval/gsm8k/acuracy", "max")
    assert not cp.observe(1, {"eval/gsm8k/accuracy": 0.5}, True)
    assert not cp.observe(2, {"eval/gsm8k/accuracy": 0.6}, True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint.best_metric=eval/gsm8k/acuracy is not among")


def test_better_ties_and_nan():
    assert bc.better(0.5, None, "max") and not bc.better(0.5, 0.5, "max") and bc.better(0.6, 0.5, "max")
    assert bc.better(0.4, 0.5, "min") and not bc.better(0.6, 0.5, "min")
    assert not bc.better(float("nan"), None, "max")


def test_latest_pointer_follows_complete_saves_only(group, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    cp = ck.Checkpointer(root, keep_last=2)
    model, opt, sched = _parts()
    cp.save(2, model, opt, sched, 2, _Saves(), _Saves())
    assert bc.read_latest(root) == {"step": 2, "path": str((root / "step_000002").resolve()), "name": "step_000002"}

    class Crash(Exception):
        pass

    def crash_at(point):
        def fault(name, step=None):
            if name == point:
                raise Crash
        return fault

    for point in ("during_checkpoint_write", "before_latest_pointer"):  # a crash mid-save, and after the rename
        monkeypatch.setattr(ck, "maybe_fault", crash_at(point))
        with pytest.raises(Crash):
            cp.save(4, model, opt, sched, 4, _Saves(), _Saves())
        assert bc.read_latest(root)["step"] == 2  # still the previous, complete save
    monkeypatch.setattr(ck, "maybe_fault", lambda *a, **k: None)
    cp.save(6, model, opt, sched, 6, _Saves(), _Saves())
    assert bc.read_latest(root)["step"] == 6
    assert not list(root.glob(".latest.json.tmp*"))


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "latest.json"
    bc.write_json_atomic(path, {"step": 1, "path": "a"})

    def boom(*a):
        raise OSError("killed")

    monkeypatch.setattr(bc.os, "replace", boom)
    with pytest.raises(OSError):
        bc.write_json_atomic(path, {"step": 2, "path": "b" * 100000})
    assert json.loads(path.read_text()) == {"step": 1, "path": "a"}


def test_latest_pointer_survives_sigkill_mid_write(tmp_path):
    """A real SIGKILL at arbitrary moments of a loop of pointer writes: the file always parses whole."""
    script = textwrap.dedent(f"""
        import sys, pathlib
        from grpo_fsdp.best_checkpoint import write_latest
        root = pathlib.Path({str(tmp_path)!r})
        step = 0
        while True:
            step += 1
            write_latest(root, step, root / ("step_" + str(step) + "x" * 20000))
            if step == 1:
                print("ready", flush=True)
    """)
    for delay in (0.05, 0.11, 0.23):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        latest = bc.read_latest(tmp_path)
        assert latest is not None and latest["path"].endswith("x" * 20000) and latest["step"] >= 1


def test_crash_between_best_renames_keeps_the_old_best(group, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _run(ck.Checkpointer(root, 3, "eval/gsm8k/accuracy", "max"), {1: 0.1}, steps=1)
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        real_replace(src, dst)
        if str(dst).endswith("best.old"):
            raise OSError("killed between the renames")

    monkeypatch.setattr(bc.os, "replace", replace_then_crash)
    with pytest.raises(OSError):
        bc.publish_best(root, root / "step_000001", {"metric": "m", "mode": "max", "value": 0.9, "step": 1})
    assert bc.best_dir(root) == root / "best.old" and bc.best_info(root)["value"] == 0.1


@pytest.mark.parametrize("overrides,problem", [
    (["algo=grpo", "checkpoint.best_metric=eval/gsm8k/accuracy"], "is not an eval/<task>/<metric> of eval.tasks=[]"),
    (["algo=grpo", "eval.tasks=[gsm8k]", "checkpoint.best_metric=accuracy"], "is not an eval/<task>/<metric>"),
    (["algo=sft", "checkpoint.best_metric=eval/gsm8k/accuracy"], "only GRPO evaluates"),
    (["checkpoint.best_mode=highest"], "unknown value 'highest'"),
])
def test_bad_best_settings_are_refused_at_start_up(overrides, problem):
    from grpo_fsdp.cli import compose
    from grpo_fsdp.config import ConfigError
    from grpo_fsdp.validation import validate

    with pytest.raises(ConfigError, match=r"^checkpoint\.best_") as e:
        validate(compose(overrides), world_size=1, cuda_available=False)
    assert problem in str(e.value)
    validate(compose(["algo=grpo", "eval.tasks=[gsm8k]", "checkpoint.best_metric=eval/gsm8k/accuracy",
                      "checkpoint.best_mode=min"]), world_size=1, cuda_available=False)
