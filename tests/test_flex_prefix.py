"""Issue 17 item 3: the GRPO training kernels against the SDPA-mask path (fp32, CPU), and the rule between them.

- FlexAttention over the shared-prefix layout (`flex_prefix.py`): log-probs, entropies and every parameter's
  gradient equal `hardware.grpo_attention=sdpa` to 1e-5; the no-grad pass (compiled, fused CPU kernel) too.
- The padding-free layout of `fa2_varlen` (`varlen.py`), built by hand and run with a reference kernel in
  place of flash-attn (CUDA-only; tests/test_gpu_attention.py runs the real one against the padded path).
- `grpo_attention.choose` and the start-up refusal of a kernel that cannot run here.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, TOY, read_metrics, run_train
from test_shared_prefix import PAD, policies, random_ids, tiny_config
from transformers import AutoModelForCausalLM, Qwen2Config

from grpo_fsdp import grpo_attention, varlen
from grpo_fsdp.attention import with_our_attention
from grpo_fsdp.cli import compose
from grpo_fsdp.config import ConfigError
from grpo_fsdp.flex_prefix import segments
from grpo_fsdp.grpo_attention import choose, row_tokens
from grpo_fsdp.policy import Policy
from grpo_fsdp.shared_prefix import pack
from grpo_fsdp.validation import validate
from grpo_fsdp.varlen import varlen_layout

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- layouts, by hand


def test_segments_by_hand():
    # the layout of test_pack_by_hand: [ p0 | p1 + pad | c0 + pad | c1 + pad + pad | c2 ], one block of C = 3
    sp = pack([[11, 12, 13], [21, 22]], [[31, 32], [41], [51, 52, 53]], [0, 0, 1], PAD, max_blocks=1)
    seg, run, completion, real = segments(sp)
    assert seg.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]  # prompts 0, 1; completions 2 + n
    assert run.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # completion 2 answers prompt 1
    assert completion.tolist() == [False] * 6 + [True] * 9
    assert real.tolist() == [True] * 5 + [False] * 10  # prompt 1's third slot is padding


def test_varlen_layout_by_hand():
    # [ p0 c0 | p0 c1 | p1 c2 ]: no padding, positions restart, token t predicted at start + len(prompt) - 1 + t
    sp = pack([[11, 12, 13], [21, 22]], [[31, 32], [41], [51, 52, 53]], [0, 0, 1], PAD, max_blocks=4)
    row = varlen_layout(sp)
    assert row.input_ids.tolist() == [[11, 12, 13, 31, 32, 11, 12, 13, 41, 21, 22, 51, 52, 53]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert row.cu_seqlens.tolist() == [0, 5, 9, 14] and row.cu_seqlens.dtype == torch.int32
    assert row.max_len == 5
    assert row.predict_at[0, :2].tolist() == [2, 3] and row.predict_at[1, :1].tolist() == [7]
    assert row.predict_at[2].tolist() == [10, 11, 12]


def test_row_tokens_and_the_rule_by_hand():
    # one prompt of 10 tokens, four completions of 2: shared row 10 + 4*2 = 18, padding-free 4*(10+2) = 48
    sp = pack([list(range(1, 11))], [[5, 6]] * 4, [0] * 4, PAD)
    assert row_tokens(sp) == (18, 48)
    assert choose("auto", sp, "cpu") == "sdpa"
    assert choose("auto", sp, "cuda", flash=False) == "sdpa"  # flex is opt-in on CUDA (grpo_attention.py)
    assert choose("auto", sp, "cuda", flash=True) == "sdpa"  # 48 > 1.05 x 18
    # two prompts of 1 token, one completion each of 9 and 1: shared pads to blocks, padding-free does not
    sp = pack([[3], [4]], [[5] * 9, [6]], [0, 1], PAD, max_blocks=1)
    assert row_tokens(sp) == (2 + 2 * 9, 10 + 2)
    assert choose("auto", sp, "cuda", flash=True) == "fa2_varlen"
    assert choose("flex", sp, "cpu") == "flex"


# ---------------------------------------------------------------- kernels against the SDPA-mask path


OWNER = [0, 0, 0, 1, 1, 2]


def case(max_blocks: int = 4):
    """(layout, target mask, random loss weights, prompts, completions): 3 prompts, 6 completions, one empty."""
    gen = torch.Generator().manual_seed(1)
    prompts = random_ids([5, 3, 7], gen)
    completions = random_ids([9, 1, 6, 2, 0, 3], gen)
    sp = pack(prompts, completions, OWNER, PAD, max_blocks=max_blocks)
    mask = sp.completion_mask()
    return sp, mask, torch.randn(mask.shape, generator=gen) * mask, prompts, completions


def compare(kernel: str, kv_heads: int, max_blocks: int, grad: bool = True, device: str = "cpu",
            dtype: torch.dtype = torch.float32, atol: float = 1e-5, rel_grad: float = 1e-5):
    """`kernel` against the SDPA-mask path on the same weights: log-probs, entropies, every parameter's gradient."""
    conf = tiny_config(Qwen2Config, kv_heads)
    ours, _ = policies(conf)
    sdpa = Policy(AutoModelForCausalLM.from_config(with_our_attention(conf)), chunk_size=7, grpo_attention="sdpa")
    sdpa.load_state_dict(ours.state_dict())
    ours.grpo_attention = kernel
    ours, sdpa = ours.to(device, dtype), sdpa.to(device, dtype)
    sp, mask, w, _, _ = case(max_blocks)
    sp, mask, w = sp.to(device), mask.to(device), w.to(device)
    with torch.set_grad_enabled(grad):
        logp, ent = ours(shared_prefix=sp, target_mask=mask, with_entropy=True)
        ref_logp, ref_ent = sdpa(shared_prefix=sp, target_mask=mask, with_entropy=True)
    torch.testing.assert_close(logp, ref_logp, atol=atol, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=atol, rtol=0)
    assert bool((logp[mask] < 0).all())
    if not grad:
        return
    (logp * w).sum().add(ent.sum()).backward()
    (ref_logp * w).sum().add(ref_ent.sum()).backward()
    ref_grads = dict(sdpa.named_parameters())
    for name, p in ours.named_parameters():
        g, r = p.grad.float(), ref_grads[name].grad.float()
        assert r.norm() > 0, name
        err = float((g - r).norm() / r.norm())
        assert err <= rel_grad, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("kv_heads,max_blocks", [(2, 4), (4, 1)], ids=["gqa-blocks", "mha-one-block"])
def test_flex_forward_and_backward_equal_sdpa_mask(kv_heads, max_blocks):
    compare("flex", kv_heads, max_blocks)


def test_flex_compiled_forward_equals_sdpa_mask():
    """No gradient: the compiled, fused CPU kernel (the scoring passes of old and reference log-probs)."""
    compare("flex", 2, 4, grad=False)


def reference_fa2(q, k, v, cu_seqlens, max_len, dropout, scale):
    """flash_attn_varlen_func(causal=True) by SDPA, one sequence at a time: [Tv, H, D] -> [Tv, Hq, D]."""
    cu = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale,
                                           enable_gqa=True).transpose(0, 1) for a, b in pairwise(cu)]
    return torch.cat(outs)


def test_varlen_layout_equals_sdpa_mask(monkeypatch):
    monkeypatch.setattr(varlen, "_fa2", reference_fa2)
    compare("fa2_varlen", 2, 4)


# ---------------------------------------------------------------- start-up refusal


def test_a_kernel_that_cannot_run_here_is_refused_in_one_line(monkeypatch):
    with pytest.raises(ConfigError) as exc:
        validate(compose(["algo=grpo", "hardware.grpo_attention=fa2_varlen"]), 1, False)
    assert str(exc.value) == ("hardware.grpo_attention: fa2_varlen: FlashAttention-2's varlen kernel needs a CUDA device; "
                              "use hardware.grpo_attention=auto (sdpa, or fa2_varlen on CUDA with flash-attn) or sdpa")
    monkeypatch.setattr(grpo_attention, "flash_attn_available", lambda: False)
    with pytest.raises(ConfigError, match="flash-attn is not installed"):
        validate(compose(["hardware=h100x2", "algo=grpo", "hardware.grpo_attention=fa2_varlen"]), 1, True)
    with pytest.raises(ConfigError, match="unknown value 'flash'"):
        validate(compose(["hardware.grpo_attention=flash"]), 1, False)
    validate(compose(["algo=grpo", "hardware.grpo_attention=flex"]), 1, False)  # runs on CPU (unfused backward)


# ---------------------------------------------------------------- the recipe: 1 vs 2 processes with flex on


@pytest.mark.distributed
@pytest.mark.slow  # two torchrun launches; the kernel's equality is covered above, the layout's 1 vs 2 in test_grpo_recipe
def test_flex_grpo_step_is_the_same_on_1_and_2_processes(tmp_path, sft_tiny):
    common = [*SMALL, *TOY, "algo=grpo", "algo.reward_workers=1", "algo.reward_format=1.0", f"model.path={sft_tiny}",
              "hardware.grpo_attention=flex", "train.max_steps=2", "algo.prompts_per_step=4", "algo.group_size=4",
              "train.global_batch_size=8", "algo.max_new_tokens=40", "optim.lr=2e-4", "optim.warmup_steps=0",
              "optim.schedule=constant", "checkpoint.export_hf=false", "checkpoint.save_final=false"]
    runs = {}
    for name, nproc, micro in (("np1_mb4", 1, 4), ("np2_mb2", 2, 2)):
        run_train([*common, f"run_dir={tmp_path / name}", f"train.micro_batch_size={micro}"], nproc=nproc)
        runs[name] = read_metrics(tmp_path / name)
    assert max(r["reward/std"] for r in runs["np1_mb4"]) > 0  # advantages are not all 0
    for a, b in zip(runs["np1_mb4"], runs["np2_mb2"], strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        for key in ("train/loss", "train/grad_norm", "train/entropy"):
            assert abs(a[key] - b[key]) <= max(1e-5 * max(abs(a[key]), abs(b[key])), 1e-7), (key, a[key], b[key])
