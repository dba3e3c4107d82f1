"""The lean decode step (rollout/decode_step.py) against transformers' own forward, step by step.

The reference is the model's forward with the same cache contents: each path gets its own preallocated cache from
one prefill, then both decode the same tokens with left-padded rows (so positions and masks differ per row).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from grpo_fsdp.attention import with_our_attention
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.decode_step import LeanDecodeStep, lean_decode_reason
from grpo_fsdp.rollout.hf import HFEngine
from grpo_fsdp.rollout.kv_cache import preallocated_cache

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97
SHAPE = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False, "initializer_range": 0.1,
         "pad_token_id": 0, "eos_token_id": 1}


def build(kind: str, dtype=torch.float32, seed: int = 0):
    conf = {"qwen2": lambda: Qwen2Config(**SHAPE),
            "llama": lambda: LlamaConfig(**SHAPE, attention_bias=False),
            "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None)}[kind]()
    conf._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(with_our_attention(conf), dtype=dtype).eval()


def decode_both(model, steps: int = 6):
    """Logits of `steps` decode steps by transformers and by the lean step -> two lists of [B, V] fp32."""
    lengths = [5, 9, 3]  # left padding: every row has its own positions
    B, P = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, P), generator=g)
    mask = torch.zeros(B, P + steps, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, P - n:] = 1
    pos = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    caches = [preallocated_cache(model.config, P + steps) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(input_ids=ids, attention_mask=mask[:, :P], position_ids=pos, past_key_values=cache, use_cache=True)
        lean = LeanDecodeStep(model)
        out = ([], [])
        nxt, next_pos = torch.randint(2, V, (B, 1), generator=g), torch.tensor(lengths)[:, None]
        for t in range(steps):
            m4 = mask.bool()[:, None, None, : P + t + 1]
            hf = model(input_ids=nxt, attention_mask=m4, position_ids=next_pos, past_key_values=caches[0],
                       use_cache=True, logits_to_keep=1).logits[:, -1]
            ours = lean(nxt, m4, next_pos, caches[1])
            out[0].append(hf.float())
            out[1].append(ours.float())
            nxt, next_pos = hf.argmax(-1, keepdim=True), next_pos + 1
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama", "mistral"])
def test_lean_step_equals_transformers_forward(kind):
    model = build(kind)
    assert lean_decode_reason(model, torch.device("cpu")) is None
    hf, ours = decode_both(model)
    for a, b in zip(hf, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    assert hf[0].abs().max() > 0.5  # not a vacuous comparison of near-zero logits


def test_lean_step_in_bf16_normalises_as_transformers_does():
    hf, ours = decode_both(build("qwen2", torch.bfloat16))
    for a, b in zip(hf, ours):  # the same ops in the same dtypes: equal up to the order of a sum, ~1 bf16 ulp
        torch.testing.assert_close(b, a, rtol=0, atol=3e-2)


def test_reasons_to_keep_transformers_forward():
    cpu = torch.device("cpu")
    model = build("qwen2")
    assert "cuda" in lean_decode_reason(model, torch.device("cuda"))
    eager = build("qwen2")
    eager.config._attn_implementation = "eager"
    assert "attention 'eager'" in lean_decode_reason(eager, cpu)
    sliding = build("qwen2")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert lean_decode_reason(sliding, cpu) == "sliding-window layers"
    mistral = build("mistral")
    mistral.config.sliding_window = 4096  # MistralConfig's default: every layer windowed
    assert lean_decode_reason(mistral, cpu) == "sliding-window layers"
    other = build("qwen2")
    other.config.model_type = "gemma"
    assert "model type 'gemma'" in lean_decode_reason(other, cpu)


def test_engine_samples_the_same_with_and_without_the_lean_step():
    """Sampled rows that stop at different steps (rows leave the batch) give the same tokens and log-probs."""
    conf = build("qwen2").config
    engines = [HFEngine(conf, [1], 0, lean_decode=lean) for lean in (False, True)]
    assert engines[0].lean_decode_reason == "turned off" and engines[1].lean_decode_reason is None
    state = build("qwen2", seed=3).state_dict()
    for e in engines:
        e.load_weights(state.items())
    prompts = [[5, 9, 2, 44], [7], [3, 3, 8, 60, 61, 62, 70]]
    sampling = SamplingConfig(n=4, max_new_tokens=24, seed=11)
    plain, lean = (e.generate(prompts, sampling) for e in engines)
    assert [c.token_ids for c in lean] == [c.token_ids for c in plain]
    assert len({len(c.token_ids) for c in plain}) > 1  # some rows stopped early: compaction ran
    for a, b in zip(plain, lean):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)


def test_static_cache_keeps_transformers_forward():
    engine = HFEngine(build("qwen2").config, [1], 0, static_cache=True)
    assert engine.lean_decode_reason == "static cache"
