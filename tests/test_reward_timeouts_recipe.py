"""The reward scoring budget: its fields are validated, and in GRPO with every answer's grading timing out
the step's scoring ends at its budget, the timeouts are counted exactly in metrics.jsonl, and the console
says so (they were only in metrics.jsonl before)."""

from __future__ import annotations

import pytest
from conftest import SMALL, read_metrics, run_train

from grpo_fsdp.cli import compose
from grpo_fsdp.config import ConfigError
from grpo_fsdp.validation import validate


@pytest.mark.parametrize(("override", "message"), [
    ("algo.reward_step_budget_s=0", "algo.reward_step_budget_s: must be positive, got 0.0"),
    ("algo.reward_timeout_warn_share=1.5", "algo.reward_timeout_warn_share: 1.5 is outside [0, 1]"),
])
def test_budget_and_warn_share_are_validated(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(["algo=grpo", override]), world_size=1, cuda_available=False)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.timeout(600)
def test_timeouts_past_the_share_warn_on_the_console_and_the_budget_bounds_the_step(tmp_path):
    run_dir = tmp_path / "grpo"
    # Every reward worker stops itself (SIGSTOP) on its first answer, as one stuck in sympy's C code does:
    # the first answer times out after 0.5 s, its worker is killed and replaced, and the 1.5 s budget
    # runs out for the rest (or for the replacement's first answer) while the replacement starts.
    proc = run_train([*SMALL, "algo=grpo", "algo.reward_workers=1", f"run_dir={run_dir}", "train.max_steps=2",
                      "algo.prompts_per_step=2", "algo.group_size=2", "train.global_batch_size=4",
                      "train.micro_batch_size=2", "algo.max_new_tokens=8", "optim.warmup_steps=0",
                      "algo.reward_timeout_s=0.5", "algo.reward_step_budget_s=1.5", "checkpoint.save_final=false",
                      "rollout.engine=hf"],
                     env={"GRPO_FSDP_FAULT": "reward_grade::stop"})
    rows = read_metrics(run_dir)
    assert [r["reward/timeouts"] for r in rows] == [4.0, 4.0]
    assert all(1 <= r["reward/over_budget"] <= 4 for r in rows), [r["reward/over_budget"] for r in rows]
    assert [r["reward/mean"] for r in rows] == [0.0, 0.0]
    assert all(1.5 <= r["perf/score_seconds"] < 1.5 + 2.0 for r in rows), [r["perf/score_seconds"] for r in rows]
    warnings = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "grading timed out" in line]
    assert len(warnings) == 2, proc.stdout + proc.stderr
    assert warnings[0].startswith("warning: step 1: 4 of 4 answers (100%) scored 0 because grading timed out")
    assert "s budget ran out (algo.reward_timeout_s=0.5 per answer, algo.reward_step_budget_s=1.5 per step)" in warnings[0]
