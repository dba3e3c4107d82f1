"""The shared-prefix layout (each prompt once, its completions attending to it) against independent references.

`pack` is checked against tensors written out by hand; `Policy(shared_prefix=...)` against transformers'
own padded forward (plain "sdpa", the same weights) of prompt + completion rows: log-probs, entropies
and every parameter's gradient; `micro_batches` scores the same completion tokens in both layouts.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, Qwen2Config

from grpo_fsdp.attention import with_our_attention
from grpo_fsdp.data.sft import SFTSample, collate
from grpo_fsdp.policy import Policy
from grpo_fsdp.recipes.rollout_batch import Rollout, micro_batches
from grpo_fsdp.shared_prefix import pack

VOCAB, PAD = 300, 0


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- pack, by hand


def test_pack_by_hand():
    # prompt 0 = [11, 12, 13], prompt 1 = [21, 22]; completions [31, 32] and [41] answer prompt 0, [51, 52, 53]
    # prompt 1. One block (max_blocks=1): the completions in their own order, each padded to C = 3.
    sp = pack([[11, 12, 13], [21, 22]], [[31, 32], [41], [51, 52, 53]], [0, 0, 1], PAD, max_blocks=1)
    assert (sp.runs, sp.prefix_len) == (2, 3)
    # [ p0 | p1 + pad | c0 + pad | c1 + pad + pad | c2 ]
    assert sp.input_ids.tolist() == [[11, 12, 13, 21, 22, 0, 31, 32, 0, 41, 0, 0, 51, 52, 53]]
    # prompts count from 0; a completion continues from its own prompt's length (3, 3, then 2)
    assert sp.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5, 2, 3, 4]]
    assert len(sp.blocks) == 1
    block = sp.blocks[0]
    assert (block.rows.tolist(), block.owner.tolist(), block.length) == ([0, 1, 2], [0, 0, 1], 3)
    # [N, 1, C, P+C]: prompt keys (P = 3, prompt 1 has 2 real ones), then the completion's own keys, causally
    from_prompt0 = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    from_prompt1 = [[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 1, 0, 1, 1, 1]]
    expected_mask = torch.tensor([[from_prompt0], [from_prompt0], [from_prompt1]], dtype=torch.bool)
    assert block.key_mask.dtype == torch.bool and block.key_mask.shape == (3, 1, 3, 6)
    assert torch.equal(block.key_mask, expected_mask)
    # token 0 is predicted by the prompt's last token (flat 2 for prompt 0, flat 4 for prompt 1), token t by
    # the completion's token t-1 (completion n starts at flat 6 + 3n); columns past a completion's end are not used
    assert sp.predict_at[:, 0].tolist() == [2, 2, 4]
    assert sp.predict_at[0, :2].tolist() == [2, 6] and sp.predict_at[1, :1].tolist() == [2]
    assert sp.predict_at[2].tolist() == [4, 12, 13]
    assert sp.targets.tolist() == [[31, 32, 0], [41, 0, 0], [51, 52, 53]]
    assert sp.lengths.tolist() == [2, 1, 3]
    assert sp.real_tokens == 3 + 2 + 2 + 1 + 3
    assert sp.completion_mask().tolist() == [[True, True, False], [True, False, False], [True, True, True]]


def test_pack_length_blocks_by_hand():
    # One long completion and three short ones (one empty): the long one gets a block of its own, the short
    # ones pad to 1 instead of 6. (Padding to one block would cost 4 x 6 tokens.)
    prompts = [[11, 12], [21]]
    completions = [[31, 32, 33, 34, 35, 36], [41], [51], []]
    sp = pack(prompts, completions, [0, 0, 1, 1], PAD)
    assert [b.rows.tolist() for b in sp.blocks] == [[0], [1, 2, 3]], "length_blocks chose other blocks"
    assert [b.owner.tolist() for b in sp.blocks] == [[0], [0, 1, 1]]
    assert [b.length for b in sp.blocks] == [6, 1]
    assert (sp.runs, sp.prefix_len) == (2, 2)
    # [ p0 | p1 + pad | c0 | c1 | c2 | c3 = pad ]
    assert sp.input_ids.tolist() == [[11, 12, 21, 0, 31, 32, 33, 34, 35, 36, 41, 51, 0]]
    assert sp.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 2, 1, 1]]
    causal6 = [[1] * (t + 1) + [0] * (5 - t) for t in range(6)]
    assert torch.equal(sp.blocks[0].key_mask, torch.tensor([[[[1, 1] + row for row in causal6]]], dtype=torch.bool))
    assert torch.equal(sp.blocks[1].key_mask, torch.tensor([[[[1, 1, 1]]], [[[1, 0, 1]]], [[[1, 0, 1]]]], dtype=torch.bool))
    assert sp.predict_at[0].tolist() == [1, 4, 5, 6, 7, 8]  # prompt 0's last token, then c0's own tokens
    assert sp.predict_at[1:, 0].tolist() == [1, 2, 2]  # the last token of prompt 0, 1, 1
    assert sp.targets.tolist() == [[31, 32, 33, 34, 35, 36], [41, 0, 0, 0, 0, 0], [51, 0, 0, 0, 0, 0], [0] * 6]
    assert sp.lengths.tolist() == [6, 1, 1, 0]
    assert sp.real_tokens == 2 + 1 + 6 + 1 + 1
    assert sp.completion_mask().sum(1).tolist() == [6, 1, 1, 0]


def test_pack_empty_completion_by_hand():
    sp = pack([[5, 6]], [[7], []], [0, 0], PAD)
    assert (sp.runs, sp.prefix_len, [b.length for b in sp.blocks]) == (1, 2, [1])
    assert sp.input_ids.tolist() == [[5, 6, 7, 0]]
    assert sp.position_ids.tolist() == [[0, 1, 2, 2]]
    assert torch.equal(sp.blocks[0].key_mask, torch.ones(2, 1, 1, 3, dtype=torch.bool))
    assert sp.predict_at.tolist() == [[1], [1]]
    assert sp.targets.tolist() == [[7], [0]]
    assert sp.lengths.tolist() == [1, 0]
    assert sp.real_tokens == 3
    assert sp.completion_mask().tolist() == [[True], [False]]


def test_pack_predictors_precede_their_targets():
    """Layout-independent: the input at predict_at[n, t] is the token before token t of completion n."""
    gen = torch.Generator().manual_seed(5)
    prompts = random_ids([4, 7, 2], gen)
    completions = random_ids([5, 1, 9, 3, 3, 0, 8], gen)
    owner = [0, 0, 1, 1, 2, 2, 2]
    for max_blocks in (1, 2, 4):
        sp = pack(prompts, completions, owner, PAD, max_blocks=max_blocks)
        assert len(sp.blocks) <= max_blocks
        assert sorted(r for b in sp.blocks for r in b.rows.tolist()) == list(range(len(completions)))
        flat, pos = sp.input_ids[0], sp.position_ids[0]
        for n, (o, c) in enumerate(zip(owner, completions)):
            before = prompts[o] + c
            for t in range(len(c)):
                at = int(sp.predict_at[n, t])
                assert int(flat[at]) == before[len(prompts[o]) + t - 1], (max_blocks, n, t)
                assert int(pos[at]) == len(prompts[o]) + t - 1, (max_blocks, n, t)
            assert sp.targets[n, : len(c)].tolist() == c


def test_shared_prefix_to_moves_every_tensor():
    sp = pack([[11, 12], [21]], [[31, 32, 33, 34, 35, 36], [41], [51], []], [0, 0, 1, 1], PAD)
    moved = sp.to("meta")
    assert len(moved.blocks) == len(sp.blocks) == 2
    for obj, src in [(moved, sp), *zip(moved.blocks, sp.blocks)]:
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "meta" and value.shape == getattr(src, name).shape, name
                assert getattr(src, name).device.type == "cpu", name  # the original stays where it was
            elif name != "blocks":
                assert value == getattr(src, name), name


@pytest.mark.parametrize("prompts,completions,owner", [
    ([[1, 2], []], [[3], [4]], [0, 1]),  # an empty prompt
    ([[1, 2]], [[3], [4]], [0]),  # fewer owners than completions
    ([[1, 2]], [[3]], [0, 0]),  # more owners than completions
    ([], [[3]], [0]),  # no prompts
    ([[1, 2]], [], []),  # no completions
    ([[1, 2]], [[3]], [1]),  # an owner past the last prompt
    ([[1, 2]], [[3]], [-1]),  # a negative owner
])
def test_pack_rejects_bad_input(prompts, completions, owner):
    with pytest.raises(ValueError, match="pack"):
        pack(prompts, completions, owner, PAD)


# ---------------------------------------------------------------- Policy: shared prefix == padded rows

def tiny_config(cls=Qwen2Config, kv_heads: int = 2, attn: str = "sdpa"):
    conf = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=PAD,
               bos_token_id=None, eos_token_id=1, initializer_range=0.1)
    conf._attn_implementation = attn
    return conf


def policies(conf, seed: int = 0) -> tuple[Policy, Policy]:
    """(ours: `grpo_fsdp+sdpa`, reference: the same weights on plain transformers attention)."""
    torch.manual_seed(seed)
    ours = Policy(AutoModelForCausalLM.from_config(with_our_attention(conf)), chunk_size=7)
    assert ours.shared_prefix_ok and ours.config._attn_implementation == "grpo_fsdp+sdpa"
    ref = Policy(AutoModelForCausalLM.from_config(conf), chunk_size=7)
    ref.load_state_dict(ours.state_dict())
    assert ref.config._attn_implementation == conf._attn_implementation
    return ours, ref


def random_ids(lengths: list[int], gen: torch.Generator) -> list[list[int]]:
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def padded_forward(policy: Policy, prompts, completions, owner, with_entropy: bool, temperature: float):
    """The padded reference: collate(prompt + completion rows), loss on completion tokens -> [N, C] like shared."""
    rows = [SFTSample(prompts[o] + c, [False] * len(prompts[o]) + [True] * len(c)) for o, c in zip(owner, completions)]
    b = collate(rows, PAD)
    target_mask = b.pop("loss_mask")[:, 1:]
    logp, ent = policy(**b, target_mask=target_mask, with_entropy=with_entropy, temperature=temperature)

    def per_completion(dense):  # [N, L-1] -> [N, C]: token t of completion n sits at column len(prompt) - 1 + t
        C = max(max(map(len, completions)), 1)
        out = dense.new_zeros(len(completions), C)
        for n, (o, c) in enumerate(zip(owner, completions)):
            start = len(prompts[o]) - 1
            out[n, : len(c)] = dense[n, start : start + len(c)]
        return out

    assert int(target_mask.sum()) == sum(map(len, completions))
    return per_completion(logp), None if ent is None else per_completion(ent)


MODELS = [  # (config class, kv heads, temperature, max_blocks of pack)
    pytest.param(Qwen2Config, 2, 1.0, 4, id="qwen2-gqa"),
    pytest.param(Qwen2Config, 2, 1.0, 1, id="qwen2-gqa-one-block"),
    pytest.param(Qwen2Config, 4, 1.0, 4, id="qwen2-mha"),
    pytest.param(Qwen2Config, 2, 0.7, 4, id="qwen2-gqa-T0.7"),
    pytest.param(LlamaConfig, 2, 1.0, 4, id="llama-gqa"),
    pytest.param(LlamaConfig, 4, 0.7, 4, id="llama-mha-T0.7"),
    pytest.param(Phi3Config, 2, 1.0, 4, id="phi3-gqa"),
]


@pytest.mark.parametrize("cls,kv_heads,temperature,max_blocks", MODELS)
def test_policy_shared_prefix_equals_padded(cls, kv_heads, temperature, max_blocks):
    ours, ref = policies(tiny_config(cls, kv_heads))
    gen = torch.Generator().manual_seed(1)
    prompts = random_ids([5, 3, 7], gen)  # different lengths
    completions = random_ids([9, 1, 6, 2, 1, 3], gen)  # different lengths, two of length 1
    owner = [0, 0, 0, 1, 1, 2]  # the last group is cut after its first completion
    sp = pack(prompts, completions, owner, PAD, max_blocks=max_blocks)
    assert len(sp.blocks) == (1 if max_blocks == 1 else 2)  # two blocks: lengths {9, 6} and {3, 2, 1, 1}
    mask = sp.completion_mask()
    w = torch.randn(mask.shape, generator=gen) * mask  # random per-token weights of the loss

    logp, ent = ours(shared_prefix=sp, target_mask=mask, with_entropy=True, temperature=temperature)
    (logp * w).sum().add(ent.sum()).backward()
    ref_logp, ref_ent = padded_forward(ref, prompts, completions, owner, True, temperature)
    (ref_logp * w).sum().add(ref_ent.sum()).backward()

    assert logp.shape == mask.shape and bool((logp[~mask] == 0).all()) and bool((ent[~mask] == 0).all())
    assert bool((logp[mask] < 0).all()) and bool((ent[mask] > 0).all())
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, r = p.grad, ref_grads[name].grad
        assert g is not None and r is not None, name
        assert r.norm() > 0, name
        assert (g - r).norm() <= 1e-5 * r.norm(), f"{name}: relative gradient error {float((g - r).norm() / r.norm()):.2e}"


def test_policy_shared_prefix_needs_our_attention():
    torch.manual_seed(0)
    conf = tiny_config(attn="eager")
    policy = Policy(AutoModelForCausalLM.from_config(with_our_attention(conf)), chunk_size=7)
    assert policy.config._attn_implementation == "eager" and not policy.shared_prefix_ok
    sp = pack([[3, 4, 5]], [[6, 7]], [0], PAD)
    with pytest.raises(RuntimeError, match="algo.shared_prefix"):
        policy(shared_prefix=sp, target_mask=sp.completion_mask())


# ---------------------------------------------------------------- micro_batches: both layouts score the same tokens


def small_rollout(group_size: int = 3) -> Rollout:
    gen = torch.Generator().manual_seed(2)
    prompts = random_ids([6, 2, 4], gen)
    tokens = random_ids([3, 1, 5, 2, 2, 4, 1, 6, 3], gen)
    return Rollout(prompts=prompts, tokens=tokens,
                   truncated=torch.tensor([False, False, True, False, True, False, False, False, True]),
                   rewards=torch.arange(9, dtype=torch.float32), group_size=group_size)


def scored(policy: Policy, mb: dict) -> list[list[float]]:
    """The scored log-probs of each completion of a micro-batch, in completion order."""
    with torch.no_grad():
        logp, _ = policy(**mb["inputs"], target_mask=mb["target_mask"])
    return [logp[n][mb["target_mask"][n]].tolist() for n in range(logp.shape[0])]


@pytest.mark.parametrize("drop_truncated", [False, True])
def test_micro_batches_score_the_same_tokens(drop_truncated):
    rollout = small_rollout()
    adv = torch.linspace(-1, 1, 9)
    keep = torch.tensor([True, True, True, False, True, True, True, False, True])
    indices = range(1, 9)  # micro-batches [1, 2, 3], [4, 5, 6], [7, 8]: every one cuts a group
    args = (rollout, adv, keep, indices, 3, PAD, drop_truncated)
    shared, padded = micro_batches(*args, shared_prefix=True), micro_batches(*args, shared_prefix=False)
    assert [mb["index"].tolist() for mb in shared] == [mb["index"].tolist() for mb in padded] == [[1, 2, 3], [4, 5, 6], [7, 8]]

    ours, _ = policies(tiny_config())
    for s, p in zip(shared, padded):
        idx = s["index"].tolist()
        assert torch.equal(s["adv"], adv[idx]) and torch.equal(p["adv"], adv[idx])
        # hand count: every token of a kept completion (and, with drop_truncated, one not cut at the limit)
        scores = [bool(keep[i]) and not (drop_truncated and bool(rollout.truncated[i])) for i in idx]
        want = [len(rollout.tokens[i]) if ok else 0 for i, ok in zip(idx, scores)]
        assert s["target_mask"].sum(1).tolist() == want and p["target_mask"].sum(1).tolist() == want
        # tokens the network processes: each distinct prompt once, vs every row's prompt + completion
        runs = dict.fromkeys(i // rollout.group_size for i in idx)
        assert s["tokens"] == sum(len(rollout.prompts[r]) for r in runs) + sum(len(rollout.tokens[i]) for i in idx)
        assert p["tokens"] == sum(len(rollout.prompt_of(i)) + len(rollout.tokens[i]) for i in idx)
        got, ref = scored(ours, s), scored(ours, p)
        for i, g, r, ok in zip(idx, got, ref, scores):
            assert len(g) == len(r) == (len(rollout.tokens[i]) if ok else 0), i
            torch.testing.assert_close(torch.tensor(g), torch.tensor(r), atol=1e-5, rtol=0)
