"""HFEngine (the transformers rollout engine) against independent recomputations on a tiny Qwen2.

Every reference here avoids the engine's own machinery: prompts generated one at a time, log-probs
recomputed by one cache-free forward of prompt + completion, greedy decoding by argmax.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from grpo_fsdp.rollout import Completion, GenerationStats, RolloutEngine, SamplingConfig
from grpo_fsdp.rollout.hf import HFEngine, stop_token_ids
from grpo_fsdp.rollout.sampler import truncate_logits
from grpo_fsdp.tokenizer import build_tiny_tokenizer

TOK = build_tiny_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
PROMPTS = [TOK.encode(s) for s in ("7+5=", "What is 12 times 3? Answer:", "x", "The quick brown fox jumps over the lazy dog.")]
assert len({len(p) for p in PROMPTS}) == len(PROMPTS)  # all lengths differ: left padding is exercised


def tiny_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=EOS, pad_token_id=PAD,
        initializer_range=0.1,  # peakier than the default 0.02: fewer near-ties for greedy comparisons
    )


def reference_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()


def make_engine(state: dict[str, torch.Tensor], **kwargs) -> HFEngine:
    engine = HFEngine(tiny_config(), stop_token_ids(TOK, tiny_config()), PAD, **kwargs)
    engine.load_weights(state.items())
    return engine


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model0():
    return reference_model(0)


@pytest.fixture(scope="module")
def engine(model0):
    return make_engine(model0.state_dict())


def greedy(max_new_tokens: int = 24, n: int = 1) -> SamplingConfig:
    return SamplingConfig(n=n, temperature=0.0, max_new_tokens=max_new_tokens)


@torch.no_grad()
def recompute_logprobs(model, prompt: list[int], completion: Completion, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at the generated tokens, from one forward of prompt + completion, no cache."""
    ids = torch.tensor([prompt + completion.token_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert stop_token_ids(TOK, tiny_config()) == [EOS]


# (a) left padding: a batch of different lengths decodes exactly as each prompt alone
def test_greedy_batch_equals_each_prompt_alone(engine, model0):
    batch = engine.generate(PROMPTS, greedy())
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], greedy())[0]
        assert batch[i].token_ids == alone.token_ids, f"prompt {i}"
        torch.testing.assert_close(torch.tensor(batch[i].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
        # greedy: every token is the argmax of a cache-free forward, log-probs at temperature 1
        assert batch[i].token_ids == _argmax_continuation(model0, prompt, len(alone.token_ids))
        expected = recompute_logprobs(model0, prompt, batch[i], temperature=1.0)
        torch.testing.assert_close(torch.tensor(batch[i].logprobs), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def _argmax_continuation(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


# (b) the reported log-probs are log_softmax(logits / T) of the sampled tokens, untruncated
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.9)])
def test_sampled_logprobs_match_full_forward(engine, model0, temperature, top_k, top_p):
    sampling = SamplingConfig(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=20, seed=1)
    out = engine.generate(PROMPTS, sampling)
    for c in out:
        assert len(c.logprobs) == len(c.token_ids) > 0
        expected = recompute_logprobs(model0, PROMPTS[c.prompt_index], c, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


# (c) the seed fixes the samples
def test_seed_reproducibility(engine):
    def run(seed):
        out = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_new_tokens=16, seed=seed))
        return [c.token_ids for c in out]

    assert run(7) == run(7)
    assert run(7) != run(8)


# (d) n = G completions per prompt, prompt-major, sampled independently; chunking changes nothing
def test_group_order_and_chunking(engine):
    G = 3
    out = engine.generate(PROMPTS, SamplingConfig(n=G, temperature=1.0, max_new_tokens=12, seed=3))
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(G)]
    for i in range(len(PROMPTS)):  # the G rows share one prefill but not their samples
        assert len({tuple(c.token_ids) for c in out[i * G : (i + 1) * G]}) > 1
    whole = engine.generate(PROMPTS, greedy(n=G))
    chunked = HFEngine(tiny_config(), [EOS], PAD, max_batch_size=5)  # 5 splits groups across chunks
    chunked.load_weights(engine.model.state_dict().items())
    assert [c.token_ids for c in chunked.generate(PROMPTS, greedy(n=G))] == [c.token_ids for c in whole]


# (e) finish reasons: EOS forced at a known step by swapping two rows of the LM head
def test_finish_reason_stop_and_length(model0):
    base = make_engine(model0.state_dict())
    sampling = greedy(max_new_tokens=24, n=2)
    original = base.generate(PROMPTS, sampling)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 24 and EOS not in c.token_ids for c in original)

    # Token X first appears at step k of prompt 0's greedy output. With the LM-head rows of X and
    # EOS swapped, every greedy path is unchanged until it would emit X, and emits EOS there instead.
    x = original[0].token_ids[4]
    k = original[0].token_ids.index(x) + 1
    swapped = make_engine(swap_with_eos(model0, x))  # several rows stop early: the done rows are compacted away
    out = swapped.generate(PROMPTS, sampling)

    assert out[0].finish_reason == "stop" and len(out[0].token_ids) == k and out[0].token_ids[-1] == EOS
    for c, ref in zip(out, original):
        if x in ref.token_ids:
            cut = ref.token_ids.index(x)
            assert c.finish_reason == "stop" and c.token_ids == ref.token_ids[:cut] + [EOS]
            assert len(c.logprobs) == cut + 1
        else:
            assert c.finish_reason == "length" and c.token_ids == ref.token_ids
    assert any(c.finish_reason == "length" for c in out)
    stats = swapped.last_stats
    assert stats.generated_tokens == sum(len(c.token_ids) for c in out) and stats.sequences == len(out)


def swap_with_eos(model, x: int) -> dict[str, torch.Tensor]:
    """The model's weights with the LM-head rows of token x and EOS exchanged."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    state["lm_head.weight"][[x, EOS]] = state["lm_head.weight"][[EOS, x]]
    return state


@torch.no_grad()
def eos_boosted_state(model, alpha: float = 3.0) -> dict[str, torch.Tensor]:
    """EOS's LM-head row along the mean final hidden state: EOS becomes likely, at varying steps."""
    h = model.model(input_ids=torch.tensor([[t for p in PROMPTS for t in p]])).last_hidden_state[0].mean(0)  # [H]
    state = {name: t.clone() for name, t in model.state_dict().items()}
    state["lm_head.weight"][EOS] = alpha * h / h.norm() ** 2
    return state


def test_finished_rows_leave_the_batch_without_changing_the_others(model0):
    """Sampling with many early stops: dropping finished rows (dynamic cache) leaves every sample
    equal to decoding the full batch to the end (static cache), and log-probs still match."""
    state = eos_boosted_state(model0)
    sampling = SamplingConfig(n=4, temperature=0.7, top_k=50, max_new_tokens=24, seed=11)
    compacting = make_engine(state).generate(PROMPTS, sampling)
    full = make_engine(state, static_cache=True).generate(PROMPTS, sampling)
    stops = [len(c.token_ids) for c in compacting if c.finish_reason == "stop"]
    assert len(stops) >= 4 and len(set(stops)) >= 3 and len(stops) < len(compacting)  # stops at several steps
    assert [c.token_ids for c in compacting] == [c.token_ids for c in full]
    assert all(c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] for c in compacting if c.finish_reason == "stop")
    model = reference_model(0)
    model.load_state_dict(state)
    for c in compacting:
        expected = recompute_logprobs(model, PROMPTS[c.prompt_index], c, 0.7)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


def test_ignore_eos_runs_every_sample_to_max_new_tokens(model0):
    """Forced lengths (benchmarks): the same samples, continued past the EOS where they stopped."""
    state = eos_boosted_state(model0)
    sampling = SamplingConfig(n=4, temperature=0.7, top_k=50, max_new_tokens=24, seed=11)
    stopping = make_engine(state).generate(PROMPTS, sampling)
    forced = make_engine(state).generate(PROMPTS, dataclasses.replace(sampling, ignore_eos=True))
    assert sum(c.finish_reason == "stop" for c in stopping) >= 4
    assert all(f.finish_reason == "length" and len(f.token_ids) == len(f.logprobs) == 24 for f in forced)
    for c, f in zip(stopping, forced):  # counter-based noise: position t draws the same numbers either way
        assert f.token_ids[: len(c.token_ids)] == c.token_ids
        torch.testing.assert_close(torch.tensor(f.logprobs[: len(c.logprobs)]), torch.tensor(c.logprobs), atol=1e-5, rtol=0)


# (f) load_weights replaces the model: a reload equals a fresh engine built with those weights
def test_load_weights_changes_outputs(engine, model0):
    model1 = reference_model(1)
    reloaded = make_engine(model0.state_dict())
    before = [c.token_ids for c in reloaded.generate(PROMPTS, greedy())]
    reloaded.load_weights(model1.state_dict().items())
    after = [c.token_ids for c in reloaded.generate(PROMPTS, greedy())]
    fresh = [c.token_ids for c in make_engine(model1.state_dict()).generate(PROMPTS, greedy())]
    assert after == fresh and after != before
    with pytest.raises(KeyError, match="no weight named"):
        reloaded.load_weights([("model.not_a_weight", torch.zeros(1))])


# (g) degenerate truncation is greedy
def test_topk1_and_tiny_topp_equal_greedy(engine):
    ref = [c.token_ids for c in engine.generate(PROMPTS, greedy())]
    top_k1 = engine.generate(PROMPTS, SamplingConfig(n=1, temperature=1.0, top_k=1, max_new_tokens=24, seed=5))
    top_p0 = engine.generate(PROMPTS, SamplingConfig(n=1, temperature=0.8, top_p=1e-6, max_new_tokens=24, seed=5))
    assert [c.token_ids for c in top_k1] == ref
    assert [c.token_ids for c in top_p0] == ref


def test_truncate_logits_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    # top-p 0.6: sorted 0.5, 0.25 (mass above 0.5 < 0.6), then 0.15 (mass above 0.75 >= 0.6): dropped
    assert torch.isfinite(truncate_logits(logits, 0, 0.6)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(truncate_logits(logits, 3, 1.0)).tolist() == [[False, True, True, True]]
    # top-k first, then top-p over the renormalised survivors: 0.5/0.75 = 0.67 >= 0.6, so one token
    assert torch.isfinite(truncate_logits(logits, 2, 0.6)).tolist() == [[False, True, False, False]]


def test_sleep_and_wake_up(model0):
    engine = make_engine(model0.state_dict())
    ref = [c.token_ids for c in engine.generate(PROMPTS, greedy())]
    engine.sleep(1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, greedy())
    engine.wake_up()
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy())] == ref
    engine.sleep(2)  # storage freed
    assert all(p.numel() == 0 for p in engine.model.parameters())
    engine.wake_up()
    with pytest.raises(RuntimeError, match="load_weights"):
        engine.generate(PROMPTS, greedy())
    engine.load_weights(model0.state_dict().items())
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy())] == ref


def test_static_cache_equals_dynamic(engine, model0):
    static = make_engine(model0.state_dict(), static_cache=True)
    for sampling in (greedy(n=2), SamplingConfig(n=2, temperature=0.7, max_new_tokens=16, seed=2)):
        want = engine.generate(PROMPTS, sampling)
        got = static.generate(PROMPTS, sampling)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        for c, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)


def test_stats_and_config_validation(engine):
    engine.generate(PROMPTS[:2], greedy(max_new_tokens=8, n=2))
    s = engine.last_stats
    assert (s.calls, s.sequences, s.generated_tokens) == (1, 4, 32)
    assert s.prompt_tokens == 2 * (len(PROMPTS[0]) + len(PROMPTS[1])) and s.seconds > 0 and s.tokens_per_s > 0
    assert engine.total_stats.generated_tokens >= 32
    assert set(GenerationStats().as_dict()) >= {"rollout/tokens_per_s", "rollout/generated_tokens"}
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(n=1, top_p=0.0)
    with pytest.raises(ValueError, match="prompt 0"):
        engine.generate([[]], greedy())


# (h) the samples of a prompt depend on (seed, key, j) only: not on its batch neighbours or chunking
def test_samples_do_not_depend_on_batch_layout(engine):
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=12, seed=21)
    whole = engine.generate(PROMPTS, sampling, keys=[10, 11, 12, 13])
    alone = [engine.generate([PROMPTS[i]], sampling, keys=[10 + i]) for i in range(len(PROMPTS))]
    reordered = engine.generate(PROMPTS[::-1], sampling, keys=[13, 12, 11, 10])
    chunked = HFEngine(tiny_config(), [EOS], PAD, max_batch_size=2)
    chunked.load_weights(engine.model.state_dict().items())
    split = chunked.generate(PROMPTS, sampling, keys=[10, 11, 12, 13])
    want = [c.token_ids for c in whole]
    assert [c.token_ids for a in alone for c in a] == want
    assert [c.token_ids for c in split] == want
    assert [c.token_ids for i in range(3, -1, -1) for c in reordered[3 * i : 3 * i + 3]] == want
    # another key is another stream
    assert [c.token_ids for c in engine.generate(PROMPTS, sampling, keys=[20, 21, 22, 23])] != want


@pytest.mark.parametrize("max_logits_mb", [256, 1e-6])  # all prompts in one right-padded batch; one per forward
def test_prompt_logprobs_match_single_prompt_forwards(engine, model0, max_logits_mb):
    """The probe's engine side: every prompt token after the first, as one cache-free forward of that prompt alone."""
    got = engine.prompt_logprobs(PROMPTS, max_logits_mb=max_logits_mb)
    assert [len(g) for g in got] == [len(p) - 1 for p in PROMPTS]
    for p, g in zip(PROMPTS, got):
        with torch.no_grad():
            logits = model0(input_ids=torch.tensor([p]), use_cache=False).logits[0, :-1].float()
        want = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(p[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)
