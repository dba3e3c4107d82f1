"""The rollout sampler (`rollout.sampler.Sampler`): exact log-probs, the right distribution, no layout dependence.

References are independent brute force: a full-vocabulary log_softmax gather, the softmax /
exponential-noise race on whole [B, V] tensors (the sampler before issue 13), and a chi-square
goodness-of-fit test against softmax(logits / T) over a 6-token vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from grpo_fsdp.rollout import SamplingConfig
from grpo_fsdp.rollout.noise import (
    E_MAX,
    E_MIN,
    column_codes,
    exponential_noise,
    exponential_noise_at,
    row_codes,
    stream_ids,
)
from grpo_fsdp.rollout.sampler import Sampler, truncate_logits

pytestmark = pytest.mark.usefixtures("one_thread")

# 99.9% quantile of chi-square with 5 degrees of freedom (6 categories)
CHI2_5_999 = 20.515


def _logits(b: int, v: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.5), (0.0, 0, 1.0)])
def test_logprob_is_the_untruncated_log_softmax_gather(dtype, temperature, top_k, top_p):
    """log_softmax(logits / T)[token] of the full, untruncated distribution (T = 0: of logits), in fp32."""
    logits = _logits(9, 3001, dtype)
    streams = torch.tensor(stream_ids(4, list(range(9)), [0] * 9))
    sampling = SamplingConfig(n=1, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1)
    tok, logp = Sampler(sampling, 3001, torch.device("cpu"), rows_per_block=2).sample(logits, streams, 5)
    z = logits.double() / (temperature or 1.0)
    ref = z.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref, rtol=0, atol=2e-6)
    kept = torch.isfinite(truncate_logits(logits.float() / (temperature or 1.0), top_k, top_p))
    assert kept.gather(-1, tok[:, None]).all()  # only tokens that survive truncation are drawn
    if temperature == 0.0:
        assert torch.equal(tok, logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 50, 0.8)])
def test_samples_equal_the_whole_tensor_race(temperature, top_k, top_p):
    """Block-wise, in-place race == argmax(softmax(truncated logits / T) / E) on whole tensors, any block size."""
    B, V, step = 7, 2000, 11
    logits = _logits(B, V, seed=1)
    streams = torch.tensor(stream_ids(9, list(range(B)), [0] * B))
    sampling = SamplingConfig(n=1, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1)
    kept = truncate_logits(logits / temperature, top_k, top_p)
    ref = (kept.softmax(-1) / exponential_noise(streams, step, V)).argmax(-1)
    for rows in (1, 3, B):
        tok, _ = Sampler(sampling, V, torch.device("cpu"), rows_per_block=rows).sample(logits, streams, step)
        assert torch.equal(tok, ref), rows
    # a row's sample depends on its stream only, not on its neighbours
    tok_sub, _ = Sampler(sampling, V, torch.device("cpu")).sample(logits[2:5], streams[2:5], step)
    assert torch.equal(tok_sub, ref[2:5])


def _peaked(b: int, v: int, seed: int) -> torch.Tensor:
    """Logits of a trained model's shape: a handful of tokens within ~20 nats of the top, the rest 25-60 below."""
    g = torch.Generator().manual_seed(seed)
    z = -25 - 35 * torch.rand(b, v, generator=g)
    near = torch.randint(0, v, (b, 12), generator=g)
    return z.scatter_(1, near, -20 * torch.rand(b, 12, generator=g))  # ties and near-ties among the near tokens


@pytest.mark.parametrize("temperature,top_k,top_p,dtype", [(1.0, 0, 1.0, torch.float32), (0.8, 0, 1.0, torch.float32),
                                                            (1.0, 0, 1.0, torch.bfloat16), (1.0, 5, 0.95, torch.float32)])
def test_pruned_race_draws_the_dense_race_tokens(temperature, top_k, top_p, dtype):
    """The race on the survivors only (tokens within ~20 nats of the top) picks exactly the dense race's token,
    with the same log-prob, over many steps; and it did prune (so the test exercises the sparse path)."""
    B, V = 13, 5000
    streams = torch.tensor(stream_ids(7, list(range(B)), [0] * B))
    sampling = SamplingConfig(n=1, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1)
    sparse = Sampler(sampling, V, torch.device("cpu"), rows_per_block=4)
    for step in range(40):
        logits = _peaked(B, V, seed=step).to(dtype)
        if step % 10 == 0:  # a tie at the top: the first index wins in both
            logits[:, 7] = logits[:, 3] = logits.amax(-1) + 1
        tok, lp = sparse.sample(logits, streams, step)
        ref_tok, ref_lp = Sampler(sampling, V, torch.device("cpu"), rows_per_block=4, prune=False).sample(logits, streams, step)
        assert torch.equal(tok, ref_tok), step
        assert torch.equal(lp, ref_lp), step
    assert sparse.survivors < 0.01 * sparse.raced  # ~12 of 5,000 per row raced


def test_flat_rows_fall_back_to_the_dense_race():
    """A flat distribution (a random init) leaves nearly every token in the race: the dense path runs, same tokens."""
    B, V = 6, 3000
    logits = _logits(B, V, seed=4)
    streams = torch.tensor(stream_ids(1, list(range(B)), [0] * B))
    sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=1)
    smp = Sampler(sampling, V, torch.device("cpu"))
    tok, _ = smp.sample(logits, streams, 2)
    assert smp.survivors == smp.raced == B * V
    assert torch.equal(tok, Sampler(sampling, V, torch.device("cpu"), prune=False).sample(logits, streams, 2)[0])


def test_noise_at_coordinates_is_the_dense_noise_bit_for_bit_and_within_its_bounds():
    B, V, step = 5, 4099, 3
    streams = torch.tensor(stream_ids(11, list(range(B)), [0] * B))
    dense = exponential_noise(streams, step, V)
    rows, cols = torch.meshgrid(torch.arange(B), torch.arange(V), indexing="ij")
    pick = torch.randperm(B * V, generator=torch.Generator().manual_seed(0))[:2000]
    r, c = rows.flatten()[pick], cols.flatten()[pick]
    at = exponential_noise_at(row_codes(streams, step)[r], column_codes(V)[c])
    assert torch.equal(at, dense[r, c])
    assert float(dense.min()) >= E_MIN * (1 - 1e-6) and float(dense.max()) <= E_MAX * (1 + 1e-6)
    u = torch.tensor([1 - 2.0**-24, 2.0**-24])  # the extreme uniforms give the bounds
    torch.testing.assert_close(-u.log(), torch.tensor([E_MIN, E_MAX]), rtol=1e-6, atol=0)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.5, 4)])
def test_race_has_the_softmax_distribution_chi_square(temperature, top_k):
    """40,000 draws (one per stream) over 6 tokens: chi-square against softmax(logits / T) (top-k: renormalised
    over the k kept) under the 99.9% quantile; the same counts fail against what a sampler that ignores the
    temperature (or the truncation) would draw, so the test can fail."""
    n, logits = 40_000, torch.tensor([[1.0, 0.5, 0.0, -0.3, -1.0, 0.8]])
    sampling = SamplingConfig(n=1, temperature=temperature, top_k=top_k, max_new_tokens=1)
    streams = torch.tensor(stream_ids(2026, list(range(n)), [0] * n))
    tok, _ = Sampler(sampling, 6, torch.device("cpu"), rows_per_block=4096).sample(logits.expand(n, 6), streams, 0)
    counts = torch.bincount(tok, minlength=6)
    want = truncate_logits(logits / temperature, top_k, 1.0).softmax(-1)[0]
    assert _chi2(counts, want.clamp(min=1e-12)) < CHI2_5_999
    wrong = truncate_logits(logits, top_k, 1.0).softmax(-1)[0]  # temperature ignored
    assert _chi2(counts, wrong.clamp(min=1e-12)) > 10 * CHI2_5_999
    if top_k:  # truncation ignored: the dropped tokens were expected but never drawn
        assert counts[want == 0].sum() == 0
        assert _chi2(counts, (logits / temperature).softmax(-1)[0]) > 10 * CHI2_5_999


def test_tied_head_engine_uses_one_tensor_and_reports_exact_logprobs():
    """A tied head stays one tensor in the engine after load_weights (the head is the embedding, used in place),
    and the sampled tokens' log-probs equal a full log_softmax of a cache-free forward."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_fsdp.rollout.hf import HFEngine

    conf = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=0, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()
    engine = HFEngine(conf, [0], 0)
    engine.load_weights(ref.state_dict().items())
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    prompt = [5, 17, 42]
    sampling = SamplingConfig(n=3, temperature=0.8, top_k=50, max_new_tokens=6, seed=3, ignore_eos=True)
    for c in engine.generate([prompt], sampling):
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].double()
        want = (logits / 0.8).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want, rtol=0, atol=1e-5)
