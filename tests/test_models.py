"""Model loading and the parallelize options, through the trainer as a user runs it."""

import pytest
import torch
from conftest import SMALL, read_metrics, run_train
from safetensors.torch import load_file

FEW = [*SMALL, "train.max_steps=3"]


def test_local_model_dir_loads_exactly_under_two_processes(tmp_path):
    """meta init -> fully_shard -> rank 0 reads the files and broadcasts: the weights arrive intact."""
    source = tmp_path / "source"
    run_train([*FEW, f"run_dir={source}", "checkpoint.export_hf=true"])
    # a second run from that directory with a learning rate too small to move any weight:
    # what it exports must be bit-identical to what it loaded
    again = tmp_path / "again"
    run_train([*SMALL, "train.max_steps=1", f"model.path={source / 'hf'}", f"run_dir={again}", "optim.lr=1e-30",
               "checkpoint.export_hf=true"], nproc=2)
    a, b = load_file(str(source / "hf" / "model.safetensors")), load_file(str(again / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and its first loss is the trained model's loss (well below a fresh model's ln 259 = 5.56)
    assert read_metrics(again)[0]["train/loss"] < read_metrics(source)[0]["train/loss"] - 0.2


def test_activation_checkpointing_keeps_the_numbers(tmp_path):
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    run_train([*FEW, f"run_dir={plain}"])
    run_train([*FEW, f"run_dir={ac}", "hardware.activation_checkpointing=true"])
    for x, y in zip(read_metrics(plain), read_metrics(ac)):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-6)
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_compiled_blocks_keep_the_numbers(tmp_path):  # ~70 s on 2 cores: inductor compiles C++
    plain, comp = tmp_path / "plain", tmp_path / "compiled"
    run_train([*FEW, f"run_dir={plain}"])
    run_train([*FEW, f"run_dir={comp}", "hardware.compile=true", "hardware.activation_checkpointing=true"])
    for x, y in zip(read_metrics(plain), read_metrics(comp)):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)


def test_flash_attention_request_falls_back_to_sdpa_with_one_warning(capsys):
    from grpo_fsdp.models import attention_backend

    assert attention_backend("flash_attention_2", "cpu") == "sdpa"
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: FlashAttention-2 needs a CUDA device; using attn_implementation=sdpa"]
    assert attention_backend("eager", "cpu") == "eager"


def test_missing_model_dir_is_one_line(tmp_path):
    proc = run_train([*FEW, f"model.path={tmp_path}/nothing/here"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (f"error: model.path: directory '{tmp_path}/nothing/here' does not exist; "
         "point model.path at a saved model directory or a hub id like Qwen/Qwen2.5-1.5B")]


def test_a_model_built_from_shapes_takes_a_real_tokenizer(qwen_tokenizer_dir):
    """`model.tokenizer` with `model.path` empty: random weights of any shape (benchmarks/grpo_step.py)
    with Qwen2.5's tokenizer, whose 151,665 tokens fit in the architecture's 151,936 rows."""
    from grpo_fsdp.config import ArchConfig, ModelConfig
    from grpo_fsdp.models import hf_config, load_tokenizer

    cfg = ModelConfig(tokenizer=str(qwen_tokenizer_dir), arch=ArchConfig(vocab_size=151936))
    tok = load_tokenizer(cfg)
    # the instruct tokenizer: <|im_end|> ends a turn, <|endoftext|> pads
    assert (len(tok), tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        151665, "<|im_end|>", 151645, "<|endoftext|>", 151643)
    conf = hf_config(cfg, tok, "sdpa")
    assert (conf.vocab_size, conf.eos_token_id, conf.pad_token_id) == (151936, 151645, 151643)
    assert tok("12+7=19").input_ids == [16, 17, 10, 22, 28, 16, 24]  # Qwen2.5 splits digits one by one


def test_reference_is_a_frozen_copy_in_param_dtype_that_reshards_after_forward():
    """algo.beta > 0 builds a reference (issue 11, item 16): before, a second full fp32 policy with grads
    enabled. Now: the policy's weights cast to hardware.param_dtype, frozen, and resharded after every
    forward (the policy's root stays gathered after a forward without backward; the reference's must not)."""
    from torch.distributed.tensor import DTensor

    from grpo_fsdp import distributed
    from grpo_fsdp.cli import compose
    from grpo_fsdp.models import build_policy, build_reference, load_tokenizer

    cfg = compose([*SMALL, "algo=grpo", "algo.beta=0.04", "hardware.param_dtype=bfloat16"])
    d = distributed.init("cpu")
    try:
        tok = load_tokenizer(cfg.model)
        policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, cfg.train.seed, 64)
        reference = build_reference(policy, conf, cfg.model, cfg.hardware, d, 64)
        assert {p.dtype for p in policy.parameters()} == {torch.float32}  # the trained copy keeps its fp32 master
        assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
        pairs = list(zip(reference.named_parameters(), policy.named_parameters(), strict=True))
        assert all(n == m and torch.equal(r.to_local(), p.to_local().to(torch.bfloat16)) for (n, r), (m, p) in pairs)

        ids = torch.tensor([[5, 9, 14, 20, 7]])
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones(1, 4, dtype=torch.bool)}
        with torch.no_grad():
            ref_logp, _ = reference(**kw)
            pol_logp, _ = policy(**kw)
        assert isinstance(reference.lm_head.weight, DTensor)  # the root is sharded again
        assert not isinstance(policy.lm_head.weight, DTensor)  # what a policy-built reference would have kept gathered
        torch.testing.assert_close(ref_logp, pol_logp, rtol=0, atol=0)  # both compute on the same bf16 weights
    finally:
        distributed.shutdown()
