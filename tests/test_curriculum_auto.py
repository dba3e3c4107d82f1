"""data.curriculum=auto (issue 16): the SENT file computed at start-up when missing, reused when complete, recomputed
for another model; and one GRPO run that uses it together with the entropy mask (algo.entropy_top_quantile)."""

from pathlib import Path

import pytest
from conftest import SMALL, read_metrics, run_train
from test_curriculum import TOOL, _FakeEngine

from grpo_fsdp.curriculum import auto, cache, tool


@pytest.mark.usefixtures("one_thread")
def test_auto_computes_a_missing_file_then_reuses_it_and_recomputes_for_another_model(tmp_path, monkeypatch):
    from grpo_fsdp import distributed
    from grpo_fsdp.cli import compose

    calls = []
    monkeypatch.setattr(tool, "_engine", lambda cfg, tok, path: _FakeEngine(calls))
    out = tmp_path / "c.jsonl"
    base = [o for o in TOOL if o.split("=")[0] not in ("samples", "batch")]
    d = distributed.init("cpu")  # auto broadcasts rank 0's path
    written = []
    try:
        def resolved(*extra):
            return auto.resolve(compose(["algo=grpo", *base, "data.curriculum=auto", "data.curriculum_samples=4",
                                         f"data.curriculum_file={out}", *extra]), d.is_main)

        data = resolved()
        assert (data.curriculum, data.curriculum_file) == ("sent", str(out))
        key, rows = cache.read(out)
        assert len(rows) == 10 and key["samples"] == 4 and len(calls) == 1  # 10 prompts in one batch of 16
        assert resolved().curriculum_file == str(out) and len(calls) == 1  # complete: nothing sampled again
        resolved("model.arch.hidden_size=32")  # another model: moved aside, all 10 again
        assert len(calls) == 2 and (tmp_path / "c.jsonl.stale").is_file()
        default = auto.resolve(compose(["algo=grpo", *base, "data.curriculum=auto", "data.curriculum_samples=4"]), d.is_main)
        written = [Path(default.curriculum_file), Path(default.curriculum_file).with_suffix(".png")]
        assert default.curriculum_file.startswith("outputs/curriculum/arithmetic-")  # the tool's default path
        none = compose(["algo=grpo", *base])
        assert auto.resolve(none, d.is_main) is none.data and len(calls) == 3
    finally:
        distributed.shutdown()
        for f in written:
            f.unlink(missing_ok=True)


def test_grpo_with_auto_curriculum_and_entropy_mask(tmp_path):
    """The trainer, 1 process, tiny model: data.curriculum=auto writes the missing file with the transformers engine,
    the steps walk its stages, and algo.entropy_top_quantile=0.2 logs a threshold that splits kept from dropped
    tokens, about a fifth of them kept."""
    out, run_dir = tmp_path / "c.jsonl", tmp_path / "run"
    run_train([*SMALL, "data.limit=16", "algo=grpo", "algo.reward_workers=1", "algo.max_new_tokens=8",
               "algo.prompts_per_step=4", "algo.group_size=2", "train.global_batch_size=8", "train.micro_batch_size=4",
               "optim.warmup_steps=0", "rollout.engine=hf", "train.max_steps=2", "data.curriculum=auto",
               f"data.curriculum_file={out}", "data.curriculum_samples=2", "data.curriculum_stages=2",
               "algo.entropy_top_quantile=0.2", f"run_dir={run_dir}"])
    _, rows = cache.read(out)
    assert len(rows) == 16
    train = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["curriculum/stage"] for r in train] == [0, 0]  # 8 prompts per stage: 2 steps of 4
    for r in train:  # 8 completions of up to 8 tokens per step; ceil(0.2 n) kept, more only on ties
        assert 0.2 <= r["train/entropy_kept_frac"] < 0.4
        assert r["train/entropy_kept_mean"] >= r["train/entropy_threshold"] > r["train/entropy_dropped_mean"]
