"""Secrets stay out of the run directory: a real short run with W&B offline is given a URL password and a
W&B-style 40-hex key on its command line, and no file under the run directory (config.yaml, metrics.jsonl,
the offline .wandb transaction log, wandb-metadata.json, debug logs, checkpoints) may hold either. W&B
records the process's argv in its run metadata, so the values must be scrubbed there too."""

from __future__ import annotations

import pytest
from conftest import SMALL, run_train

from grpo_fsdp.redaction import redact, redact_args, scrub

PASSWORD = "Pa55wordLeakTest9"
WANDB_KEY = "d3adb33f" * 5  # 40 hex digits, the shape of a W&B API key
HF_TOKEN = "hf_" + "QwErTy" * 6
OPENAI_KEY = "sk-proj-" + "AbCd1234" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"https://alice:{PASSWORD}@example.invalid/ds", "https://alice:<redacted>@example.invalid/ds"),
        (f"git+ssh://bob:{PASSWORD}@host:22/x.git", "git+ssh://bob:<redacted>@host:22/x.git"),
        (WANDB_KEY, "<redacted>"),  # a whole value of 40 hex digits
        (f"/hub/models--Qwen--X/snapshots/{WANDB_KEY}/", f"/hub/models--Qwen--X/snapshots/{WANDB_KEY}/"),  # a sha in a path
        (f"key is {HF_TOKEN}.", "key is <redacted>."),
        (OPENAI_KEY, "<redacted>"),
        # not secrets: a user without a password, a hub id, a path, a short hex, an underscore word
        ("https://alice@example.invalid/ds", "https://alice@example.invalid/ds"),
        ("Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-1.5B"),
        ("/data/task-sk-learn/hf_cache", "/data/task-sk-learn/hf_cache"),
        ("d3adb33f", "d3adb33f"),
        ("hf_token", "hf_token"),
    ],
)
def test_scrub(text, expected):
    assert scrub(text) == expected


def test_redact_tree_by_name_and_by_value():
    tree = {
        "logging": {"wandb_api_key": "abc123", "project": "p"},
        "data": {"hub_id": f"https://u:{PASSWORD}@h/ds", "hub_config": WANDB_KEY, "name": "gsm8k"},
        "list": [HF_TOKEN, 3, None],
        "tokenizer": "t",
        "key": "",
    }
    assert redact(tree) == {
        "logging": {"wandb_api_key": "<redacted>", "project": "p"},
        "data": {"hub_id": "https://u:<redacted>@h/ds", "hub_config": "<redacted>", "name": "gsm8k"},
        "list": ["<redacted>", 3, None],
        "tokenizer": "t",
        "key": "",
    }


def test_redact_args():
    argv = [
        "algo=sft",
        f"+logging.wandb_api_key={WANDB_KEY}",
        "++hf_token=abc",
        f"data.hub_id=https://u:{PASSWORD}@h/ds",
        f"--token={HF_TOKEN}",
        f"data.hub_config={WANDB_KEY}",
        "train.max_steps=2",
        "~logging.api_key",
    ]
    assert redact_args(argv) == [
        "algo=sft",
        "+logging.wandb_api_key=<redacted>",
        "++hf_token=<redacted>",
        "data.hub_id=https://u:<redacted>@h/ds",
        "--token=<redacted>",
        "data.hub_config=<redacted>",
        "train.max_steps=2",
        "~logging.api_key",
    ]


def test_no_secret_in_any_file_of_the_run_dir(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    # data.hub_id and data.hub_config are real fields that the arithmetic data set does not read.
    run_train([*SMALL, "algo=sft", f"run_dir={run_dir}", "train.max_steps=2", "logging.wandb=true",
               f"data.hub_id=https://alice:{PASSWORD}@example.invalid/ds", f"data.hub_config={WANDB_KEY}"],
              env={"WANDB_MODE": "offline"})
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    leaks = [str(p.relative_to(run_dir)) for p in files
             if PASSWORD.encode() in (data := p.read_bytes()) or WANDB_KEY.encode() in data]
    assert leaks == []
    config = (run_dir / "config.yaml").read_text()
    assert "hub_id: https://alice:<redacted>@example.invalid/ds" in config and "hub_config: <redacted>" in config
