"""Issue 15 items 2-4 through the trainer (`algo=dpo`): step-0 loss ln 2, cached reference log-probs equal to the
online reference, an interrupted precompute that resumes, kill-and-resume bit-identical, the cache key, 1 vs 2
gloo ranks and two micro-batch sizes, and bad inputs in one line."""

from __future__ import annotations

import json
import math
import signal

import pytest
from conftest import SMALL, read_metrics, run_train

from grpo_fsdp.cli import compose
from grpo_fsdp.config import ConfigError
from grpo_fsdp.data.preference import PreferenceSample
from grpo_fsdp.recipes.dpo_reference import cache_key
from grpo_fsdp.validation import validate

DPO = [*SMALL, "algo=dpo", "data=preference_arithmetic", "data.arithmetic.num_train=64", "data.instruction=''",
       "train.max_steps=3", "algo.ref_rows_per_shard=16", "algo.beta=0.5", "optim.lr=3e-3", "optim.warmup_steps=0"]


def _numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "system/"))} for r in rows]


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-6)


def test_ln2_cache_equals_online_and_interrupted_runs_continue_bit_identically(tmp_path):
    straight, online, resumed = tmp_path / "straight", tmp_path / "online", tmp_path / "resumed"
    common = [*DPO, "algo.eval_pairs=16"]  # and 16 held-out pairs of the test split scored at the end (dpo_eval.py)
    proc = run_train([*common, f"run_dir={straight}"])
    cache, held_out = sorted((straight / "ref_logps").iterdir(), key=lambda p: len(list(p.iterdir())), reverse=True)
    assert f"reference log-probs: scoring 4 of 4 shards (0 already in {cache})\n" in proc.stdout
    assert f"reference log-probs: scoring 1 of 1 shards (0 already in {held_out})\n" in proc.stdout
    assert sorted(p.name for p in cache.iterdir()) == [f"shard_0000{k}.pt" for k in range(4)]
    a = read_metrics(straight)
    assert a[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    assert a[0]["train/rewards_margin"] == pytest.approx(0, abs=1e-5) and a[-1]["train/grad_norm"] > 0
    assert a[-1]["train/loss"] != a[0]["train/loss"]  # it moved
    assert "eval/reward_accuracy" in a[-1] and all("eval/reward_accuracy" not in r for r in a[:-1])
    assert f"held-out pairs (16): reward accuracy {a[-1]['eval/reward_accuracy']:.1%}, margin " in proc.stdout

    # precompute_ref=false: a frozen copy scores each micro-batch online; with padded rows (shared_prefix=false), too.
    # The same steps to 1e-5.
    run_train([*common, f"run_dir={online}", "algo.precompute_ref=false", "algo.shared_prefix=false"])
    assert not (online / "ref_logps").exists()
    for x, y in zip(a, read_metrics(online), strict=True):
        for key in ("train/loss", "train/grad_norm", "train/logps_chosen"):
            assert _close(x[key], y[key]), (key, x[key], y[key])
        for key in ("train/rewards_chosen", "train/rewards_rejected"):  # beta x fp32 sums of ~-300: absolute
            assert abs(x[key] - y[key]) <= 1e-4, (key, x[key], y[key])
    last = read_metrics(online)[-1]
    assert last["eval/reward_accuracy"] == a[-1]["eval/reward_accuracy"]
    assert abs(last["eval/rewards_margin"] - a[-1]["eval/rewards_margin"]) <= 1e-4

    # killed while writing the cache (after shard 1), then after step 1, then to the end: bit-identical to straight
    auto = [*common, f"run_dir={resumed}", "checkpoint.resume=auto", "checkpoint.every_steps=1"]
    killed = run_train(auto, env={"GRPO_FSDP_FAULT": "ref_shard_written:1"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    killed = run_train(auto, env={"GRPO_FSDP_FAULT": "after_step:1"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    cache = resumed / "ref_logps" / cache.name  # the same content hash as the straight run's
    assert f"reference log-probs: scoring 2 of 4 shards (2 already in {cache})\n" in killed.stdout
    proc = run_train(auto)
    assert f"reference log-probs: reusing {cache} (64 pairs)\n" in proc.stdout
    assert "resumed at step 1 from " in proc.stdout
    b = read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert _numbers(a) == _numbers(b)  # exact: losses, rewards, log-probs, lengths (the data position too)


def _samples(n: int = 3) -> list[PreferenceSample]:
    return [PreferenceSample([1, 2, i], [3, 4], [5, 6, 7]) for i in range(n)]


def test_cache_key_follows_model_data_and_lengths(tmp_path):
    base = ["algo=dpo", "data=preference_arithmetic"]
    key = cache_key(compose(base), _samples())
    assert key == cache_key(compose([*base, "train.max_steps=7", "optim.lr=1e-5"]), _samples())  # training fields: same
    changed = {
        "init seed of the tiny model": cache_key(compose([*base, "train.seed=1"]), _samples()),
        "architecture": cache_key(compose([*base, "model.arch.num_layers=3"]), _samples()),
        "data.max_length": cache_key(compose([*base, "data.max_length=300"]), _samples()),
        "data.max_prompt_length": cache_key(compose([*base, "data.max_prompt_length=100"]), _samples()),
        "compute dtype": cache_key(compose([*base, "hardware.param_dtype=bfloat16"]), _samples()),
        "a row": cache_key(compose(base), _samples()[:2] + [PreferenceSample([1, 2, 2], [3, 4], [5, 6, 8])]),
        "row count": cache_key(compose(base), _samples(2)),
        "LoRA: the base scores": cache_key(compose([*base, "hardware.lora.enabled=true"]), _samples()),
        "QLoRA: the NF4 base scores": cache_key(compose([*base, "hardware.lora.enabled=true", "hardware.load_in_4bit=true"]),
                                                _samples()),
    }
    assert all(k != key for k in changed.values()) and len(set(changed.values())) == len(changed), changed
    # the adapters never score (they are off): their rank does not change the key
    assert cache_key(compose([*base, "hardware.lora.enabled=true", "hardware.lora.rank=4"]), _samples()) == \
        changed["LoRA: the base scores"]
    # a local model directory: its weight files' size and mtime count
    model = tmp_path / "sft"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 10)
    local = compose([*base, f"model.path={model}", "model.name=sft"])
    first = cache_key(local, _samples())
    assert first == cache_key(local, _samples()) and first != key
    (model / "model.safetensors").write_bytes(b"y" * 11)
    assert cache_key(local, _samples()) != first


@pytest.mark.distributed
def test_world_size_and_micro_batch_do_not_change_the_dpo_step(tmp_path):
    runs = {}
    # np2_tok: each rank's 4 pairs packed into micro-batches of <= 285 tokens (pairs of 111-157 tokens): at step 1
    # rank 0 runs 4 micro-batches (145, 144, 144, 143 tokens) and rank 1 two (143 + 142, 142 + 142) and two fillers
    # (recipes/dpo.py, rank_micro_batches)
    # 2 ranks change the world size and the micro-batch at once (np2_mb4 alone added ~40 s and nothing np2_mb1 misses)
    for name, nproc, extra in (("np1_mb4", 1, []), ("np2_mb1", 2, ["train.micro_batch_size=1"]),
                               ("np2_tok", 2, ["algo.micro_batch_tokens=285"])):
        # beta 0.1 (TRL's default): at 0.5 the step-2 loss of np2_tok differed by 1.06e-5 relative on a freshly booted VM
        # (a1ae561 as well): beta x fp32 rounding of log-prob sums of ~-300, not the normalisation (whose bugs are O(1))
        run_train([*(x for x in DPO if not x.startswith("algo.beta=")), "algo.beta=0.1", f"run_dir={tmp_path / name}", *extra],
                  nproc=nproc)
        runs[name] = read_metrics(tmp_path / name)
    single = runs["np1_mb4"]
    for other in ("np2_mb1", "np2_tok"):
        for x, y in zip(single, runs[other], strict=True):
            for key in ("train/loss", "train/grad_norm", "train/logps_rejected"):  # the 1e-5 relative
                assert _close(x[key], y[key]), (other, x["step"], key, x[key], y[key])
            # beta x differences of fp32 sums of ~-300: compared absolutely
            assert abs(x["train/rewards_margin"] - y["train/rewards_margin"]) <= 1e-4, (other, x["step"])
    assert single[-1]["train/loss"] != single[0]["train/loss"]


@pytest.mark.parametrize("overrides,message", [
    (["algo.beta=0"], "algo.beta: must be positive, got 0.0; set algo.beta=<a number > 0>"),
    (["algo.loss=hinge"], "algo.loss: unknown value 'hinge'; choose one of sigmoid, dpo_norm, ipo, robust"),
    (["data.max_prompt_length=192"], "data.max_length: 192 leaves no room after data.max_prompt_length=192; set data.max_length > 192"),
    (["data=gsm8k"], ("data.name: algo=dpo needs preference pairs, not 'gsm8k'; use data=preference data.path=<pairs.jsonl> "
                     "(or data.hub_id=...), or data=preference_arithmetic")),
    (["algo.label_smoothing=0.5"], ("algo.label_smoothing: 0.5 is outside [0, 0.5); give the assumed share of flipped labels, "
                                   "e.g. algo.label_smoothing=0.1 (0: none)")),
    (["algo.loss=ipo", "algo.label_smoothing=0.1"], ("algo.label_smoothing: IPO has no label smoothing; set "
                                                    "algo.label_smoothing=0 with algo.loss=ipo")),
    (["algo=sft"], ("data.name: preference_arithmetic holds preference pairs, which only algo=dpo trains on; add algo=dpo, "
                   "or pick a math data set for algo=sft")),
    (["algo.warmup_ratio=0.1", "optim.warmup_steps=2"], ("algo.warmup_ratio: 0.1 and optim.warmup_steps=2 both set the "
                                                        "warmup; set optim.warmup_steps=0 to use the ratio, or algo.warmup_ratio=0")),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        base = ["data=preference_arithmetic"] if "algo=sft" in overrides else DPO  # DPO's algo.* fields are not SFT's
        validate(compose([*base, *overrides]), world_size=1, cuda_available=False)
    assert str(e.value) == message


def test_bad_preference_files_end_in_one_line_exit_2(tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a"}) for i in range(3)) + "\n")
    same = tmp_path / "same.jsonl"
    same.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "a"}) for i in range(3)) + "\n")
    for path, line in [
        (missing, (f"error: data: no usable preference pairs in {missing}: all 3 rows are malformed (3x no 'rejected' field "
                  "(first at row 1)); data=preference expects JSON objects with 'prompt', 'chosen' and 'rejected' (strings), "
                  "or 'chosen' and 'rejected' chat message lists sharing the prompt turns; fix the file or point data.path at another")),
        (same, ("error: data: no preference pair is usable: all 3 rows skipped (3x chosen equal to rejected); check that chosen "
               "and rejected differ and are non-empty, and that data.max_length leaves room after data.max_prompt_length")),
    ]:
        proc = run_train([*DPO, "data=preference", f"data.path={path}", f"run_dir={tmp_path / 'run'}"], check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == line


def test_epochs_and_warmup_ratio_set_the_run_length():
    from grpo_fsdp.config import DPOConfig, OptimConfig, TrainConfig
    from grpo_fsdp.recipes.dpo import run_length

    train, optim = TrainConfig(max_steps=60, global_batch_size=128), OptimConfig(warmup_steps=0)
    assert run_length(DPOConfig(), train, optim, 1000) == (60, optim)  # epochs = 0: train.max_steps
    steps, o = run_length(DPOConfig(epochs=1, warmup_ratio=0.1), train, optim, 1000)
    assert (steps, o.warmup_steps) == (7, 1)  # 1000 // 128 = 7 batches; round(0.7) = 1
    steps, o = run_length(DPOConfig(epochs=2.5, warmup_ratio=0.1), train, optim, 259_000)
    assert (steps, o.warmup_steps) == (5057, 506)  # 2.5 x 2023 = 5057.5 -> 5057; round(505.7) = 506


def test_presets_hold_the_published_recipes():
    olmo, tulu = compose(["experiment=olmo3-dpo-b200x4"]), compose(["experiment=tulu3-dpo-8b"])
    for cfg in (olmo, tulu):
        assert (cfg.algo.name, cfg.algo.loss, cfg.algo.beta, cfg.algo.epochs, cfg.algo.warmup_ratio) == ("dpo", "dpo_norm", 5.0, 1, 0.1)
        assert (cfg.optim.schedule, cfg.optim.min_lr_ratio, cfg.optim.warmup_steps, cfg.optim.weight_decay) == ("linear", 0, 0, 0)
        assert cfg.train.global_batch_size == 128 == 4 * cfg.train.micro_batch_size * 8 and cfg.hardware.nproc_per_node == 4
        assert cfg.hardware.param_dtype == "bfloat16" and cfg.hardware.activation_checkpointing and cfg.algo.precompute_ref
        validate(cfg, world_size=4, cuda_available=True)
    assert (olmo.optim.lr, olmo.data.max_length, olmo.data.max_prompt_length, olmo.hardware.name) == (1e-6, 8192, 4096, "b200x4")
    assert not olmo.hardware.reshard_after_forward  # ZeRO-2-like
    assert not olmo.algo.shared_prefix and tulu.algo.shared_prefix  # OLMo 3's sliding windows need padded rows
    assert (tulu.optim.lr, tulu.data.max_length) == (5e-7, 2048)


def test_held_out_reward_metrics_by_hand():
    import torch

    from grpo_fsdp.recipes.dpo_eval import reward_metrics

    # policy (chosen, rejected, lengths) vs reference: x_c = 1, x_r = -1 for pair 0; x_c = -0.5, x_r = 0.5 for pair 1
    scores = torch.tensor([[-3.0, -6.0, 2.0, 2.0], [-4.5, -4.5, 3.0, 3.0]])
    m = reward_metrics(scores, torch.tensor([-4.0, -4.0]), torch.tensor([-5.0, -5.0]), "sigmoid", 0.5, 0.0)
    assert m["eval/reward_accuracy"] == 0.5  # pair 0 right, pair 1 wrong
    assert m["eval/rewards_margin"] == pytest.approx((0.5 * 2 + 0.5 * -1) / 2)  # beta (x_c - x_r): 1.0 and -0.5
    assert m["eval/loss"] == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2)
