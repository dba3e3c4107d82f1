"""Our attention registration, the preallocated KV cache, the engine that runs both, and the reward pool's start-up.

References are independent of the code under test: transformers' plain "sdpa" with the same weights,
`DynamicCache`, a cache-free teacher-forced forward, and a hand-graded GSM8K answer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo_fsdp import attention
from grpo_fsdp.attention import attention_name, with_our_attention
from grpo_fsdp.data.gsm8k import gsm8k_gold
from grpo_fsdp.rewards import RewardScorer
from grpo_fsdp.rollout import hf
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.hf import HFEngine
from grpo_fsdp.rollout.kv_cache import PreallocatedLayer, preallocated_cache

VOCAB, PAD, EOS = 300, 0, 1


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(kv_heads: int = 2, attn: str = "sdpa", **kwargs) -> Qwen2Config:
    conf = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=False,
                       pad_token_id=PAD, bos_token_id=None, eos_token_id=EOS, initializer_range=0.1, **kwargs)
    conf._attn_implementation = attn
    return conf


def ours_and_plain(kv_heads: int = 2, seed: int = 0):
    """The same weights under `grpo_fsdp+sdpa` and under transformers' plain "sdpa"."""
    conf = tiny_config(kv_heads)
    torch.manual_seed(seed)
    ours = AutoModelForCausalLM.from_config(with_our_attention(conf)).eval()
    plain = AutoModelForCausalLM.from_config(conf).eval()
    plain.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "grpo_fsdp+sdpa" and plain.config._attn_implementation == "sdpa"
    return ours, plain


def left_padded(lengths: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random prompts, left-padded: input_ids, attention_mask, position_ids (each row counting from its first token)."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = torch.randint(2, VOCAB, (n,), generator=gen)
        mask[r, width - n :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------- attention.py


def test_attention_name():
    assert attention_name("sdpa") == "grpo_fsdp+sdpa"
    assert attention_name("sdpa") == "grpo_fsdp+sdpa"  # registered once, then looked up
    assert "grpo_fsdp+sdpa" in ALL_ATTENTION_FUNCTIONS
    assert attention_name("eager") is None  # eager attention lives in each model file: not wrapped
    assert attention_name(None) is None
    assert attention_name("") is None
    assert attention_name("no_such_attention") is None


def test_with_our_attention_returns_a_copy():
    conf = tiny_config()
    ours = with_our_attention(conf)
    assert ours is not conf
    assert ours._attn_implementation == "grpo_fsdp+sdpa"
    assert conf._attn_implementation == "sdpa"  # the exported / vLLM config keeps the plain implementation
    assert ours.to_diff_dict() | {"_attn_implementation": None} == conf.to_diff_dict() | {"_attn_implementation": None}
    eager = tiny_config(attn="eager")
    assert with_our_attention(eager)._attn_implementation == "eager" and eager._attn_implementation == "eager"


@pytest.fixture
def gqa_calls(monkeypatch) -> list[tuple]:
    """Records the calls of `attention._cpu_gqa_sdpa` (query shape, mask shape) and runs it."""
    calls, real = [], attention._cpu_gqa_sdpa

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((tuple(query.shape), None if attention_mask is None else tuple(attention_mask.shape)))
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(attention, "_cpu_gqa_sdpa", spy)
    return calls


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_our_attention_equals_plain_sdpa(kv_heads, gqa_calls):
    ours, plain = ours_and_plain(kv_heads)
    gen = torch.Generator().manual_seed(3)
    ids, mask, pos = left_padded([7, 4, 1, 6], gen)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        # GQA with a mask on CPU goes through the copy-free branch, once per layer; MHA never does
        assert gqa_calls == ([((4, 4, 7, 16), (4, 1, 7, 7))] * 2 if kv_heads == 2 else [])
        want = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        assert torch.isfinite(got).all()

        gqa_calls.clear()
        full = torch.randint(2, VOCAB, (3, 9), generator=gen)  # unpadded: no mask, the base implementation
        torch.testing.assert_close(ours(input_ids=full).logits, plain(input_ids=full).logits, atol=1e-5, rtol=0)
        assert gqa_calls == []


# ---------------------------------------------------------------- kv_cache.py


def decode(model, cache, ids, mask, pos, steps: int, feed: list[torch.Tensor] | None = None):
    """Prefill `ids`, then `steps` one-token steps (feeding `feed[t]`, or the argmax) -> (logits per step, fed, mask, pos)."""
    out = [model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]]
    fed, next_pos = [], pos[:, -1] + 1
    for t in range(steps):
        tok = out[-1].argmax(-1) if feed is None else feed[t]
        fed.append(tok)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out.append(model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], past_key_values=cache,
                         use_cache=True).logits[:, -1])
        next_pos = next_pos + 1
    return out, fed, mask, next_pos - 1


@torch.no_grad()
def test_preallocated_cache_equals_dynamic_cache():
    model, plain = ours_and_plain()
    gen = torch.Generator().manual_seed(4)
    ids, mask, pos = left_padded([6, 3, 5], gen)
    P, steps_before, steps_after = ids.shape[1], 3, 2
    capacity = P + steps_before + steps_after
    pre, dyn = preallocated_cache(model.config, capacity), DynamicCache(config=model.config)
    assert all(isinstance(layer, PreallocatedLayer) for layer in pre.layers) and len(pre.layers) == 2
    assert pre.get_seq_length() == 0

    want, fed, mask_d, pos_d = decode(model, dyn, ids, mask, pos, steps_before)
    got, _, _, _ = decode(model, pre, ids, mask, pos, steps_before, feed=fed)
    for t, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=f"step {t}")
    assert pre.get_seq_length() == dyn.get_seq_length() == P + steps_before
    assert all(layer.get_seq_length() == P + steps_before for layer in pre.layers)

    # reorder, drop and repeat rows (the engine's G-fold copy after prefill and its compaction), then go on
    idx = torch.tensor([2, 0, 0])
    pre.batch_select_indices(idx)
    dyn.batch_select_indices(idx)
    mask_d, pos_d, after = mask_d[idx], pos_d[idx], []
    for t in range(steps_after):
        tok = torch.randint(2, VOCAB, (3,), generator=gen)
        tok[2] = tok[1]  # rows 1 and 2 both continue original row 0, the same way
        after.append(tok)
        mask_d = torch.cat([mask_d, torch.ones_like(mask_d[:, :1])], dim=1)
        pos_d = pos_d + 1
        step = {"input_ids": tok[:, None], "attention_mask": mask_d, "position_ids": pos_d[:, None], "use_cache": True}
        g, w = model(**step, past_key_values=pre).logits[:, -1], model(**step, past_key_values=dyn).logits[:, -1]
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=f"step {t} after batch_select_indices")
    assert pre.get_seq_length() == dyn.get_seq_length() == capacity
    for a, b in zip(pre.layers, dyn.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    # rows 1 and 2 agree, and equal a cache-free forward of original row 0's whole sequence on plain attention
    torch.testing.assert_close(g[1], g[2], atol=0, rtol=0)
    seq = torch.cat([ids[0], torch.stack(fed)[:, 0], torch.stack(after)[:, 1]])  # row 0 is the longest: no padding
    torch.testing.assert_close(g[1], plain(input_ids=seq[None]).logits[0, -1], atol=1e-5, rtol=0)

    # full: one more position raises
    one = {"input_ids": tok[:, None], "attention_mask": torch.cat([mask_d, mask_d[:, :1]], dim=1),
           "position_ids": pos_d[:, None] + 1, "use_cache": True}
    with pytest.raises(RuntimeError, match="capacity"):
        model(**one, past_key_values=pre)


@torch.no_grad()
def test_preallocated_cache_crop_equals_dynamic_cache():
    model, plain = ours_and_plain()
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    pre, dyn = preallocated_cache(model.config, 8), DynamicCache(config=model.config)
    for cache in (pre, dyn):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.crop(-2)  # drop the last two positions
        assert cache.get_seq_length() == 3
    nxt = torch.tensor([[7], [8]])
    pos = torch.tensor([[3], [3]])
    g = model(input_ids=nxt, position_ids=pos, past_key_values=pre, use_cache=True).logits
    w = model(input_ids=nxt, position_ids=pos, past_key_values=dyn, use_cache=True).logits
    torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    # the cropped positions are gone: as if the prompt had been its first three tokens
    torch.testing.assert_close(g[:, -1], plain(input_ids=torch.cat([ids[:, :3], nxt], 1)).logits[:, -1], atol=1e-5, rtol=0)
    assert pre.get_seq_length() == dyn.get_seq_length() == 4


def test_preallocated_layer_by_hand():
    layer = PreallocatedLayer(capacity=4)
    assert layer.get_seq_length() == 0
    k1, v1 = torch.randn(2, 1, 3, 2), torch.randn(2, 1, 3, 2)
    keys, values = layer.update(k1, v1)
    assert torch.equal(keys, k1) and torch.equal(values, v1) and layer.get_seq_length() == 3
    k2, v2 = torch.randn(2, 1, 1, 2), torch.randn(2, 1, 1, 2)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and torch.equal(values, torch.cat([v1, v2], 2))
    with pytest.raises(RuntimeError, match="capacity"):
        layer.update(k2, v2)
    assert layer.get_seq_length() == 4  # the failed update left it as it was
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert torch.equal(layer.keys, torch.cat([k1, k2], 2)[[1, 1, 0]])
    assert torch.equal(layer.values, torch.cat([v1, v2], 2)[[1, 1, 0]])
    with pytest.raises(NotImplementedError):
        layer.keys = torch.zeros(3, 1, 4, 2)
    with pytest.raises(NotImplementedError):
        layer.values = torch.zeros(3, 1, 4, 2)
    assert layer.get_seq_length() == 4  # the refused assignments changed nothing
    layer.keys = None  # what DynamicLayer.reset does: empties it
    assert layer.get_seq_length() == 0


def test_preallocated_cache_falls_back_for_sliding_windows():
    conf = tiny_config(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding_attention" in conf.layer_types
    cache = preallocated_cache(conf, 16)
    assert isinstance(cache, DynamicCache) and not any(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


# ---------------------------------------------------------------- the engine: recorded log-probs == teacher forcing


@torch.no_grad()
def eos_boosted(model, prompts: list[list[int]], alpha: float) -> dict[str, torch.Tensor]:
    """EOS's LM-head row along the mean final hidden state of the prompts: EOS becomes likely, at varying steps."""
    h = model.model(input_ids=torch.tensor([[t for p in prompts for t in p]])).last_hidden_state[0].mean(0)  # [H]
    state = {name: t.clone() for name, t in model.state_dict().items()}
    state["lm_head.weight"][EOS] = alpha * h / h.norm() ** 2
    return state


def test_engine_logprobs_equal_teacher_forcing(monkeypatch):
    _, plain = ours_and_plain()
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 2, 7)]
    state = eos_boosted(plain, prompts, alpha=6.0)
    plain.load_state_dict(state)

    caches, selections = [], []  # the engine's caches, and (rows before, rows kept) of each batch_select_indices
    real_cache, real_select = hf.preallocated_cache, PreallocatedLayer.batch_select_indices

    def cache_spy(config, capacity):
        caches.append(real_cache(config, capacity))
        return caches[-1]

    def select_spy(layer, indices):
        if layer is caches[-1].layers[0]:
            selections.append((layer._k.shape[0], len(indices)))
        return real_select(layer, indices)

    monkeypatch.setattr(hf, "preallocated_cache", cache_spy)
    monkeypatch.setattr(PreallocatedLayer, "batch_select_indices", select_spy)

    engine = HFEngine(tiny_config(), [EOS], PAD)  # config says "sdpa": the engine runs grpo_fsdp+sdpa
    engine.load_weights(state.items())
    assert engine.model.config._attn_implementation == "grpo_fsdp+sdpa"
    G, max_new = 6, 16
    out = engine.generate(prompts, SamplingConfig(n=G, temperature=1.0, max_new_tokens=max_new, seed=1))

    assert len(caches) == 1 and all(isinstance(layer, PreallocatedLayer) for layer in caches[0].layers)
    # the prefill's G-fold copy (4 prompts -> 24 rows), then at least one compaction that drops finished rows
    assert selections[0] == (len(prompts), len(prompts) * G)
    assert any(kept < before for before, kept in selections[1:]), selections
    stops = [len(c.token_ids) for c in out if c.finish_reason == "stop"]
    assert len(set(stops)) >= 3 and len(stops) < len(out), stops  # stops at several steps, and some run to the end
    assert all(c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] for c in out if c.finish_reason == "stop")
    for c in out:
        prompt = prompts[c.prompt_index]
        assert len(c.logprobs) == len(c.token_ids) and (c.finish_reason == "stop" or len(c.token_ids) == max_new)
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = plain(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [len(completion), V]
        want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- rewards.py: the pool is ready before step 1

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_reward_scorer_wait_ready_then_score():
    scorer = RewardScorer(num_workers=1, timeout_s=5.0)
    try:
        scorer.wait_ready()
        assert len(scorer._workers) == 1 and all(w.ready for w in scorer._workers)
        scorer.wait_ready()  # already ready: returns at once
        gold = gsm8k_gold(GSM8K_ANSWER)
        assert gold == "72"
        completions = ["She sold 24 in May, so 48 + 24 = 72 in all. The answer is \\boxed{72}.",
                       "She sold 48 + 48 = 96. The answer is \\boxed{96}."]
        result = scorer.score(completions, [gold, gold], lengths=[20, 20], max_length=100)
        assert result.rewards == [1.0, 0.0] and result.correct == [True, False]
        assert (result.timeouts, result.parse_failures) == (0, 0)
    finally:
        scorer.close()
    assert scorer._workers == []
