"""Issue 11 items 10/11 (GRPO rollouts): prompts that do not fit are skipped and counted in one line, and
when too few remain the error names the limit that removed them (not train.global_batch_size)."""

import pytest
from conftest import SMALL, run_train

from grpo_fsdp.cli import UserError
from grpo_fsdp.data.lengths import fit_prompts


def test_prompts_over_either_limit_are_skipped_and_counted():
    # context 100, 40 new tokens: room for 60-token prompts; max_prompt_length 70 is the looser limit here
    fit = fit_prompts([10, 80, 65, 60, 20], max_prompt_length=70, max_new_tokens=40, context=100, need=2)
    assert fit.kept == [0, 3, 4]
    assert fit.summary == ("data: skipped 2 of 5 prompts: 1 longer than data.max_prompt_length=70 tokens, 1 leaving no "
                           "room for algo.max_new_tokens=40 in the model's 100-token context (longest 80)")
    assert fit_prompts([10, 20], 70, 40, None).summary is None  # all fit: no line


def test_too_few_prompts_name_the_limit_that_removed_them():
    with pytest.raises(UserError) as exc:
        fit_prompts([80, 90, 10], max_prompt_length=50, max_new_tokens=8, context=512, need=2)
    assert str(exc.value) == ("data: 1 of 3 prompts fit, fewer than algo.prompts_per_step=2: 2 are longer than "
                              "data.max_prompt_length=50 tokens (longest 90); raise data.max_prompt_length (and "
                              "data.max_length above it), or lower algo.prompts_per_step")
    with pytest.raises(UserError) as exc:
        fit_prompts([30, 40], max_prompt_length=128, max_new_tokens=600, context=512, need=1)
    assert str(exc.value) == ("data: 0 of 2 prompts fit, fewer than algo.prompts_per_step=1: every prompt (shortest 30 "
                              "tokens) plus algo.max_new_tokens=600 exceeds the model's 512-token context "
                              "(max_position_embeddings); lower algo.max_new_tokens to at most 482")
    with pytest.raises(UserError) as exc:
        fit_prompts([600, 700], max_prompt_length=1000, max_new_tokens=8, context=512, need=1)
    assert "every prompt (shortest 600 tokens) fills the model's 512-token context" in str(exc.value)


GRPO = [*SMALL, "algo=grpo", "rollout.engine=hf", "data.arithmetic.num_train=64", "algo.prompts_per_step=4",
        "algo.group_size=2", "algo.max_new_tokens=8", "optim.warmup_steps=0", "train.max_steps=1"]


def test_grpo_with_every_prompt_too_long_names_max_prompt_length(tmp_path):
    # arithmetic prompts with the default instruction are 105-111 bytes long (34 of these 64 are over 109)
    proc = run_train([*GRPO, "data.max_prompt_length=50", f"run_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data: 0 of 64 prompts fit, fewer than algo.prompts_per_step=4: 64 are longer than "
        "data.max_prompt_length=50 tokens (longest 111); raise data.max_prompt_length (and data.max_length above it), "
        "or lower algo.prompts_per_step")


def test_grpo_counts_the_prompts_it_skips_and_goes_on(tmp_path):
    proc = run_train([*GRPO, "data.max_prompt_length=109", "checkpoint.save_final=false", f"run_dir={tmp_path}"])
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("data: skipped")]
    assert skipped == ["data: skipped 34 of 64 prompts: 34 longer than data.max_prompt_length=109 tokens (longest 111)"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
