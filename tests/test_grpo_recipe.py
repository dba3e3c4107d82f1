"""The GRPO recipe end to end on the tiny model: plumbing and the per-step metrics it promises.

The maths is tested against hand-computed values in test_grpo_math.py; learning on a toy task is
the demo's job (open: the GRPO issue)."""

from conftest import SMALL, read_metrics, run_train

KEYS = {"train/loss", "train/kl", "train/entropy", "train/clip_frac_low", "train/clip_frac_high", "train/grad_norm",
        "reward/mean", "reward/std", "reward/min", "reward/max", "reward/correct_rate", "reward/timeouts",
        "reward/parse_failures", "train/advantage_mean", "train/advantage_std", "rollout/completion_length_mean",
        "rollout/completion_length_max", "rollout/truncation_rate", "perf/generation_tokens_per_s",
        "perf/training_tokens_per_s", "perf/generate_seconds", "perf/score_seconds", "perf/logprobs_seconds",
        "perf/train_seconds", "perf/sync_seconds"}


def test_grpo_steps_log_every_metric(tmp_path):
    run_dir = tmp_path / "grpo"
    run_train([*SMALL, "algo=grpo", f"run_dir={run_dir}", "train.max_steps=2", "algo.prompts_per_step=4",
               "algo.group_size=2", "train.global_batch_size=4", "train.micro_batch_size=2", "algo.max_new_tokens=8",
               "algo.reward_workers=1", "algo.updates_per_rollout=2", "optim.warmup_steps=0"], nproc=2)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert 0 <= r["reward/correct_rate"] <= 1 and r["rollout/completion_length_max"] <= 8
        # a fresh model never stops within 8 tokens by chance often: most completions are truncated
        assert 0 <= r["rollout/truncation_rate"] <= 1
        # group-normalised advantages have mean 0 over the rollout
        assert abs(r["train/advantage_mean"]) < 1e-6
