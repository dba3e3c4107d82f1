"""Issue 15 item 4: a DPO micro-batch in the shared-prefix layout (each prompt once, chosen and rejected attending to
it) gives the summed log-probs of padded, separately computed [prompt + chosen] and [prompt + rejected] rows, and so
the same DPO loss and gradients; a wrong segment boundary is caught."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from grpo_fsdp.algorithms.dpo import pair_losses
from grpo_fsdp.attention import with_our_attention
from grpo_fsdp.data.preference import PreferenceSample
from grpo_fsdp.policy import Policy
from grpo_fsdp.recipes.dpo_pairs import budget_micro_batches, layout_pairs, pack_pairs, pair_logps, processed_tokens

VOCAB, PAD = 300, 0
pytestmark = pytest.mark.usefixtures("one_thread")


def _models(seed: int = 0):
    conf = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=PAD,
                       bos_token_id=None, eos_token_id=1, initializer_range=0.1)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    ours = Policy(AutoModelForCausalLM.from_config(with_our_attention(conf)), chunk_size=7)
    plain = AutoModelForCausalLM.from_config(conf)  # transformers' own padded forward, full logits
    plain.load_state_dict(ours.state_dict(), strict=True)  # Policy keeps the Hugging Face names
    return ours, plain


def _samples(gen) -> list[PreferenceSample]:
    ids = lambda n: torch.randint(2, VOCAB, (n,), generator=gen).tolist()
    shapes = [(5, 9, 3), (3, 1, 6), (7, 4, 4), (2, 2, 8)]  # prompt, chosen, rejected lengths
    return [PreferenceSample(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def _padded_sums(plain, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Each [prompt + completion] as its own right-padded row; log_softmax of full logits, summed over the completion."""
    rows = [(s.prompt_ids, c) for s in samples for c in (s.chosen_ids, s.rejected_ids)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), PAD)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        att[i, : len(p) + len(c)] = 1
    logp = torch.log_softmax(plain(input_ids=ids, attention_mask=att).logits.float(), -1)  # [2n, L, V]
    sums = torch.stack([sum(logp[i, len(p) - 1 + t, tok] for t, tok in enumerate(c)) for i, (p, c) in enumerate(rows)])
    return sums[0::2], sums[1::2]


def test_shared_prompt_pairs_equal_padded_rows_values_and_gradients():
    ours, plain = _models()
    samples = _samples(torch.Generator().manual_seed(1))
    sp = pack_pairs(samples, PAD)
    assert sp.runs == 4 and sp.real_tokens == sum(s.tokens for s in samples)  # every prompt once
    got = pair_logps(ours, sp, torch.device("cpu"))
    want_c, want_r = _padded_sums(plain, samples)
    assert got.chosen_len.tolist() == [9, 1, 4, 2] and got.rejected_len.tolist() == [3, 6, 4, 8]
    torch.testing.assert_close(got.chosen, want_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, want_r, atol=1e-5, rtol=0)
    # algo.shared_prefix=false: the same pairs as 2n padded rows through the Policy (any attention, e.g. sliding windows)
    padded = layout_pairs(samples, PAD, shared_prefix=False)
    assert processed_tokens(padded) == sum(2 * len(s.prompt_ids) + len(s.chosen_ids) + len(s.rejected_ids) for s in samples)
    with torch.no_grad():
        rows = pair_logps(ours, padded, torch.device("cpu"))
    torch.testing.assert_close(rows.chosen, got.chosen.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.rejected, got.rejected.detach(), atol=1e-5, rtol=0)
    assert torch.equal(rows.chosen_len, got.chosen_len) and torch.equal(rows.rejected_len, got.rejected_len)
    # the DPO loss through both and every parameter's gradient (a fixed reference off the policy)
    ref_c, ref_r = want_c.detach() + 0.3, want_r.detach() - 0.2
    pair_losses("sigmoid", got.chosen, got.rejected, ref_c, ref_r, got.chosen_len, got.rejected_len, 0.5)[0].sum().backward()
    pair_losses("sigmoid", want_c, want_r, ref_c, ref_r, got.chosen_len, got.rejected_len, 0.5)[0].sum().backward()
    theirs = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        r = theirs[name].grad
        assert r is not None and r.norm() > 0, name
        assert (p.grad - r).norm() <= 1e-5 * r.norm(), f"{name}: {float((p.grad - r).norm() / r.norm()):.2e}"


def _max_gap(ours, plain, samples, sp) -> float:
    with torch.no_grad():
        got = pair_logps(ours, sp, torch.device("cpu"))
        want_c, want_r = _padded_sums(plain, samples)
    return max(float((got.chosen - want_c).abs().max()), float((got.rejected - want_r).abs().max()))


def test_a_wrong_segment_boundary_fails_the_comparison():
    ours, plain = _models()
    samples = _samples(torch.Generator().manual_seed(1))
    assert _max_gap(ours, plain, samples, pack_pairs(samples, PAD)) <= 1e-5
    # 1. completions that cannot see their prompt's last token (the boundary one key too early)
    sp = pack_pairs(samples, PAD)
    for b in sp.blocks:
        for j, owner in enumerate(b.owner.tolist()):
            b.key_mask[j, :, :, len(samples[owner].prompt_ids) - 1] = False
    assert _max_gap(ours, plain, samples, sp) > 1e-3
    # 2. completions whose positions start one token late (continuing from prompt length + 1)
    sp = pack_pairs(samples, PAD)
    cut = sp.runs * sp.prefix_len
    sp.position_ids[:, cut:] += 1
    assert _max_gap(ours, plain, samples, sp) > 1e-3
    # 3. the boundary moved in the data: the prompt's last token scored as the first completion token
    moved = [PreferenceSample(s.prompt_ids[:-1], s.prompt_ids[-1:] + s.chosen_ids, s.prompt_ids[-1:] + s.rejected_ids)
             for s in samples]
    with torch.no_grad():
        got = pair_logps(ours, pack_pairs(moved, PAD), torch.device("cpu"))
        want_c, _ = _padded_sums(plain, samples)
    assert float((got.chosen - want_c).abs().min()) > 1e-3


def test_token_budget_micro_batches_by_hand():
    tokens = [50, 120, 30, 80, 200, 70]
    # longest first (200, 120, 80, 70, 50, 30), each into the first micro-batch with room under 150:
    # 200 alone (over budget); 120 + 30; 80 + 70; 50 -> its own
    assert budget_micro_batches(range(6), tokens, 150) == [[4], [1, 2], [3, 5], [0]]
    assert budget_micro_batches([0, 2, 5], tokens, 150) == [[5, 0, 2]]  # 70 + 50 + 30 = 150 fits exactly
    assert budget_micro_batches([3, 1], tokens, 10**6) == [[1, 3]]
