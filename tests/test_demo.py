"""The demo end to end in a short version (tiny model, a few steps, 8 held-out problems), for both pipelines
(SFT -> GRPO, SFT -> DPO), its command line, the DPO demo's pair scoring, and the multi-seed table of
benchmarks/demo_seeds.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, _env

from grpo_fsdp.cli import UserError
from grpo_fsdp.demo import OUT, DemoArgs, split_args
from grpo_fsdp.demo_dpo import pair_metrics, pair_scores

SHORT = [
    "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_layers=2",
    "data.arithmetic.num_test=8", "optim.warmup_steps=1", "logging.progress_bar=false",
    "sft:train.max_steps=4", "sft:train.global_batch_size=8", "sft:train.micro_batch_size=4",
    "grpo:train.max_steps=2", "grpo:algo.prompts_per_step=2", "grpo:algo.group_size=4", "grpo:algo.max_new_tokens=16",
    "grpo:train.global_batch_size=8", "grpo:train.micro_batch_size=8",
]
FIELDS = {"seed", "lora", "sft_accuracy", "grpo_accuracy", "gain_points", "gain_ci95", "held_out_problems", "sft_mean_length",
          "grpo_mean_length", "sft_seconds", "grpo_seconds", "eval_seconds", "seconds"}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "qlora"])
def test_short_demo_writes_every_summary_field(tmp_path, lora):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.demo", f"--out={out}", "train.seed=3", *SHORT, f"lora={str(lora).lower()}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    name, grpo_dir = ("summary-lora.json", "grpo-lora") if lora else ("summary.json", "grpo")
    summary = json.loads((out / name).read_text())
    assert set(summary) == FIELDS
    assert summary["seed"] == 3 and summary["held_out_problems"] == 8 and summary["lora"] is lora
    assert summary["gain_points"] == 100 * (summary["grpo_accuracy"] - summary["sft_accuracy"])
    for key in ("sft_accuracy", "grpo_accuracy"):
        assert summary[key] * 8 == pytest.approx(round(summary[key] * 8), abs=1e-12)  # k of 8 problems
    lo, hi = summary["gain_ci95"]
    assert -100 <= lo <= summary["gain_points"] <= hi <= 100
    for end in (lo, hi):  # a resample's gain is a whole number of problems out of 8
        assert end / 12.5 == pytest.approx(round(end / 12.5), abs=1e-9)
    assert 0 < summary["sft_seconds"] + summary["grpo_seconds"] + summary["eval_seconds"] <= summary["seconds"] + 1e-6
    assert (out / "sft" / "hf").is_dir() and (out / grpo_dir / "hf").is_dir()
    assert "95% interval" in proc.stdout and str(out / name) in proc.stdout
    if lora:  # QLoRA: the adapters in PEFT format beside the merged model; the full GRPO stage did not run
        assert (out / grpo_dir / "adapter" / "adapter_model.safetensors").is_file() and not (out / "grpo").exists()
        config = (out / grpo_dir / "config.yaml").read_text()
        assert "load_in_4bit: true" in config and "all-linear" in config


DPO_SHORT = [
    "pipeline=dpo", "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_layers=2",
    "data.arithmetic.num_train=64", "data.arithmetic.num_test=8", "optim.warmup_steps=1", "logging.progress_bar=false",
    "sft:train.max_steps=4", "sft:train.global_batch_size=8", "sft:train.micro_batch_size=4",
    "dpo:train.max_steps=2", "dpo:train.global_batch_size=8", "dpo:train.micro_batch_size=8", "dpo:optim.lr=1e-3",
]
DPO_FIELDS = {"pipeline", "seed", "sft_accuracy", "dpo_accuracy", "gain_points", "gain_ci95", "held_out_problems",
              "held_out_pairs", "sft_pair_accuracy", "dpo_pair_accuracy", "reward_accuracy", "reward_margin",
              "pairs", "prompts_skipped", "pairs_gold_chosen", "sft_mean_length", "dpo_mean_length", "dpo_settings",
              "sft_seconds", "pairs_seconds", "dpo_seconds", "eval_seconds", "seconds"}


def test_short_dpo_demo_writes_every_summary_field(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.demo", f"--out={out}", "train.seed=3", *DPO_SHORT], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (out / "summary.json").exists() and not (out / "grpo").exists()
    summary = json.loads((out / "summary-dpo.json").read_text())
    assert set(summary) == DPO_FIELDS
    assert summary["pipeline"] == "dpo" and summary["seed"] == 3
    assert summary["held_out_problems"] == summary["held_out_pairs"] == 8
    assert summary["gain_points"] == 100 * (summary["dpo_accuracy"] - summary["sft_accuracy"])
    for key in ("sft_accuracy", "dpo_accuracy", "sft_pair_accuracy", "dpo_pair_accuracy", "reward_accuracy"):
        assert summary[key] * 8 == pytest.approx(round(summary[key] * 8), abs=1e-6)  # k of 8
    lo, hi = summary["gain_ci95"]
    assert -100 <= lo <= summary["gain_points"] <= hi <= 100
    assert summary["reward_margin"] != 0  # two updates at lr 1e-3 moved the policy off the reference
    assert summary["dpo_settings"]["steps"] == 2 and summary["dpo_settings"]["lr"] == 1e-3
    stages = ("sft_seconds", "pairs_seconds", "dpo_seconds", "eval_seconds")
    assert 0 < sum(summary[k] for k in stages) <= summary["seconds"] + 1e-6
    assert (out / "sft" / "hf").is_dir() and (out / "dpo" / "hf").is_dir()
    # on-policy pairs: one per training question with a wrong sample (PAIRS.per_prompt = 1), the rest counted
    rows = [json.loads(line) for line in (out / "dpo-pairs" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == summary["pairs"] > 0 and summary["pairs"] + summary["prompts_skipped"] == 64
    assert 0 <= summary["pairs_gold_chosen"] <= summary["pairs"] and all(r["chosen"] != r["rejected"] for r in rows)
    assert "on-policy pairs" in proc.stdout
    assert "implicit-reward accuracy" in proc.stdout and str(out / "summary-dpo.json") in proc.stdout


def test_arguments_split_by_stage():
    got = split_args(["--out=/tmp/x", "train.seed=1", "sft:train.max_steps=3", "grpo:algo.group_size=4"])
    assert got == DemoArgs(Path("/tmp/x"), "grpo", ["train.seed=1"], ["train.max_steps=3"], ["algo.group_size=4"], [])
    assert split_args([]) == DemoArgs(OUT, "grpo", [], [], [], [])
    got = split_args(["pipeline=dpo", "dpo:algo.beta=0.5", "sft:train.max_steps=3", "train.seed=2", "--out=d"])
    assert got == DemoArgs(Path("d"), "dpo", ["train.seed=2"], ["train.max_steps=3"], [], ["algo.beta=0.5"])
    assert split_args(["pipeline=grpo"]).pipeline == "grpo"
    assert split_args(["lora=true"]) == DemoArgs(OUT, "grpo", [], [], [], [], True)
    assert split_args(["lora=true", "lora=false"]).lora is False
    with pytest.raises(UserError, match="'lora=yes': lora takes true or false"):
        split_args(["lora=yes"])
    with pytest.raises(UserError, match="lora=true trains the GRPO stage as QLoRA; drop it with pipeline=dpo"):
        split_args(["lora=true", "pipeline=dpo"])
    with pytest.raises(UserError, match="unknown option '--outdir=x'"):
        split_args(["--outdir=x"])
    with pytest.raises(UserError, match=r"pipeline='foo' is not a pipeline; choose pipeline=grpo .* or pipeline=dpo"):
        split_args(["pipeline=foo"])
    with pytest.raises(UserError, match="dpo:algo.beta=1 is for pipeline=dpo, and this run is pipeline=grpo"):
        split_args(["dpo:algo.beta=1"])
    with pytest.raises(UserError, match="grpo:algo.group_size=4 is for pipeline=grpo, and this run is pipeline=dpo"):
        split_args(["grpo:algo.group_size=4", "pipeline=dpo"])


def test_bad_pipeline_ends_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.demo", f"--out={tmp_path}", "pipeline=foo"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "pipeline=grpo" in proc.stderr and "pipeline=dpo" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before any stage ran


def test_dpo_demo_pair_metrics_by_hand():
    # columns: summed log-prob of chosen, of rejected, and their token counts; the SFT model is the reference
    sft = torch.tensor([[-2.0, -3.0, 4.0, 4.0], [-5.0, -4.0, 2.0, 2.0], [-1.0, -1.0, 1.0, 1.0]])
    dpo = torch.tensor([[-1.5, -3.5, 4.0, 4.0], [-5.5, -4.0, 2.0, 2.0], [-1.0, -2.0, 1.0, 1.0]])
    got = pair_metrics(sft, dpo, "sigmoid", 0.5, 0.0)
    # log-ratios x_c - x_r: pair 0: 0.5 - (-0.5) = 1, pair 1: -0.5 - 0 = -0.5, pair 2: 0 - (-1) = 1; rewards x beta
    assert got["sft_pair_accuracy"] == pytest.approx(1 / 3)  # -2 > -3 only (a tie is not a win)
    assert got["dpo_pair_accuracy"] == pytest.approx(2 / 3)  # -1.5 > -3.5 and -1 > -2
    assert got["reward_accuracy"] == pytest.approx(2 / 3)
    assert got["reward_margin"] == pytest.approx(0.5 * (1 - 0.5 + 1) / 3, abs=1e-7)
    norm = pair_metrics(sft, dpo, "dpo_norm", 0.5, 0.0)  # per-token means: 1/4, -0.5/2, 1/1
    assert norm["reward_margin"] == pytest.approx(0.5 * (0.25 - 0.25 + 1) / 3, abs=1e-7)


def test_dpo_demo_pair_scores_equal_one_row_at_a_time(tmp_path):
    """Padded batches of pairs give each completion's summed log-prob of its own unpadded row (brute force)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_fsdp.data.preference import PreferenceSample

    torch.manual_seed(0)
    conf = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    model = Qwen2ForCausalLM(conf).eval()
    model.save_pretrained(tmp_path)
    samples = [PreferenceSample([5, 6, 7], [8, 9], [10, 11, 12, 13]), PreferenceSample([3], [4, 5, 6], [7]),
               PreferenceSample([9, 9, 1, 2, 3], [20], [21, 22])]
    got = pair_scores(tmp_path, samples, pad_id=0, batch_size=2)  # two batches, the first padded
    want = []
    with torch.no_grad():
        for s in samples:
            row = []
            for completion in (s.chosen_ids, s.rejected_ids):
                ids = torch.tensor([s.prompt_ids + completion])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                row.append(sum(logp[len(s.prompt_ids) - 1 + k, t].item() for k, t in enumerate(completion)))
            want.append([*row, len(s.chosen_ids), len(s.rejected_ids)])
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)
    with torch.no_grad():  # the chosen tokens of pair 0 scored one position late: the test would catch that shift
        logp = torch.log_softmax(model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits[0], -1)
    assert abs(got[0, 0].item() - (logp[3, 8] + logp[4, 9]).item()) > 1e-3


def _demo_seeds():
    spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_seeds_table_median_and_range():
    ds = _demo_seeds()
    rows = [{"seed": s, "sft_accuracy": a, "grpo_accuracy": b, "gain_points": 100 * (b - a), "gain_ci95": [lo, hi], "seconds": t}
            for s, a, b, lo, hi, t in [(0, 0.25, 0.5, 18.0, 32.0, 300.0), (1, 0.3, 0.4, 4.0, 16.0, 280.0),
                                       (2, 0.2, 0.35, 9.0, 21.0, 310.0)]]
    stats = {k: ds.spread([r[k] for r in rows]) for k in ("sft_accuracy", "grpo_accuracy", "gain_points", "seconds")}
    assert stats["gain_points"] == {"median": pytest.approx(15.0), "min": pytest.approx(10.0), "max": pytest.approx(25.0)}
    text = ds.table(rows, stats)
    assert "| 0 | 25.0% | 50.0% | +25.0 | +18.0 to +32.0 | 300 |" in text
    assert "| median | 25.0% | 40.0% | +15.0 | | 300 |" in text
    assert "| range | 20.0% to 30.0% | 35.0% to 50.0% | +10.0 to +25.0 | | 280 to 310 |" in text


def test_demo_seeds_dpo_table():
    ds = _demo_seeds()
    rows = [{"seed": s, "sft_accuracy": a, "dpo_accuracy": b, "gain_points": 100 * (b - a), "gain_ci95": [lo, hi], "seconds": t,
             "sft_pair_accuracy": p, "dpo_pair_accuracy": q, "reward_accuracy": r}
            for s, a, b, lo, hi, t, p, q, r in [(0, 0.5, 0.6, 5.0, 15.0, 400.0, 0.9, 0.95, 0.8),
                                                (1, 0.4, 0.42, -2.0, 6.0, 420.0, 0.85, 0.9, 0.75)]]
    stats = {k: ds.spread([r[k] for r in rows]) for k in ds.stat_keys("dpo")}
    assert stats["gain_points"]["median"] == pytest.approx(6.0)
    text = ds.table(rows, stats, "dpo")
    assert text.splitlines()[0].startswith("| seed | SFT | DPO | gain (points) |")
    assert "| 1 | 40.0% | 42.0% | +2.0 | -2.0 to +6.0 | 420 | 85.0% -> 90.0% | 75.0% |" in text
    assert "| median | 45.0% | 51.0% | +6.0 | | 410 | | |" in text
    assert "| range | 40.0% to 50.0% | 42.0% to 60.0% | +2.0 to +10.0 | | 400 to 420 | | |" in text
    args, extra = ds.parse_args(["--pipeline", "dpo", "--seeds", "0,1", "--", "dpo:algo.beta=2"])
    assert (args.pipeline, args.seeds, extra) == ("dpo", [0, 1], ["dpo:algo.beta=2"])
    with pytest.raises(SystemExit):  # the pipeline is --pipeline's: the summary file to read depends on it
        ds.parse_args(["--", "pipeline=dpo"])


def test_demo_seeds_cpu_model_is_named():
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout if Path("/usr/bin/lscpu").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    got = _demo_seeds().cpu_model()
    assert got and (got == name if name else True)


def test_a_stage_stopped_by_sigterm_stops_the_demo(tmp_path, monkeypatch, capsys):
    """A stage that saved a checkpoint and returned 0 without exporting hf/ (the trainer's SIGTERM path) must not
    hand a missing model to the next stage: the demo stops with one line that says how to resume."""
    import grpo_fsdp.demo as demo_module

    calls = []
    monkeypatch.setattr(demo_module, "main", lambda overrides: calls.append(overrides) or 0)
    assert demo_module.demo([f"--out={tmp_path}"]) == 1
    assert len(calls) == 1  # the GRPO stage never started
    assert f"run_dir={tmp_path / 'sft'}" in calls[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"demo: the SFT stage stopped before its last step (its checkpoint is in {tmp_path / 'sft'}); "
                   "run the same command again to resume it")]
    (tmp_path / "sft" / "hf").mkdir(parents=True)  # a finished stage: the demo goes on to GRPO
    monkeypatch.setattr(demo_module, "main", lambda overrides: calls.append(overrides) or 7)
    assert demo_module.demo([f"--out={tmp_path}"]) == 7 and len(calls) == 2
