"""The engine/trainer mismatch (algorithms/rollout_correction.py): TIS and MIS weights and the mismatch
metrics against values worked out by hand, their effect on the loss and its gradient, and a deliberately
perturbed transformers engine run through the recipe's own rollout -> micro-batch -> optimizer-step path."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fsdp.algorithms.grpo import grpo_loss
from grpo_fsdp.algorithms.rollout_correction import correction_weights, mis_weights, mismatch_sums, tis_weights


def close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0), (a, b)


# rho = pi_trainer / pi_engine: row 0 = [1, 3, 1/4, 3/2]; row 1 = [3, 3, (padding)], row 2 = [2.5, 1/2.5, (padding)]
RHO = [[1.0, 3.0, 0.25, 1.5], [3.0, 3.0, 1.0, 1.0], [2.5, 0.4, 1.0, 1.0]]
MASK = torch.tensor([[True] * 4, [True, True, False, False], [True, True, False, False]])
OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.1, -2.0, -2.0], [-0.2, -4.0, -1.0, -1.0]])
ENGINE = OLD - torch.log(torch.tensor(RHO))
ENGINE = torch.where(MASK, ENGINE, -9.0)  # off the mask the engine tensor holds anything: it must not leak in


def test_tis_token_and_sequence_by_hand():
    close(tis_weights(OLD, ENGINE, MASK, 2.0), [[1, 2, 0.25, 1.5], [2, 2, 1, 1], [2, 0.4, 1, 1]])
    # sequence: the geometric mean of the scored rhos, capped: row 0 (3 * 0.25 * 1.5)^(1/4) = 1.125^(1/4),
    # row 1 3 -> 2, row 2 (2.5 * 0.4)^(1/2) = 1
    g0 = 1.125 ** 0.25
    close(tis_weights(OLD, ENGINE, MASK, 2.0, "sequence"), [[g0] * 4, [2.0] * 4, [1.0] * 4])


def test_mis_token_and_sequence_by_hand():
    # band [1/2, 2]: 3, 1/4, 2.5 and 0.4 are out
    assert mis_weights(OLD, ENGINE, MASK, 2.0).tolist() == [[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    # by sequence: row 0 (1.03) and row 2 (1.0) stay whole although they hold out-of-band tokens; row 1 (3) goes
    assert mis_weights(OLD, ENGINE, MASK, 2.0, "sequence").tolist() == [[1] * 4, [0] * 4, [1] * 4]
    # a wider band keeps 2.5 and 0.4 (C = 3: [1/3, 3], 3 itself on the edge stays)
    assert mis_weights(OLD, ENGINE, MASK, 3.0 + 1e-6).tolist() == [[1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_mismatch_sums_by_hand():
    s = mismatch_sums(OLD, ENGINE, MASK, 2.0)
    scored = [r for row, m in zip(RHO, MASK.tolist()) for r, k in zip(row, m) if k]
    close(s["kl"], sum(r - 1 - math.log(r) for r in scored), 1e-5)  # k3 with rho = pi_trainer / pi_engine
    close(s["abs"], sum(abs(math.log(r)) for r in scored), 1e-5)
    close(s["abs_max"], math.log(4), 1e-6)
    assert int(s["outside"]) == 6 and int(s["tokens"]) == 8
    same = mismatch_sums(OLD, OLD, MASK, 2.0)
    assert float(same["kl"]) == 0 and float(same["abs_max"]) == 0 and int(same["outside"]) == 0


ADV = torch.tensor([1.0, -0.5, 2.0])
NORM = {"global_tokens": 8}


def loss_and_grad(weights, old=OLD):
    logp = old.clone().requires_grad_(True)  # mu = 1: the PPO ratio is 1, each token's loss is -A (gradient -A)
    loss, _ = grpo_loss(logp, old, None, ADV, MASK, aggregation="dapo", normalisers=NORM, token_weights=weights)
    loss.backward()
    return loss.detach(), logp.grad


@pytest.mark.parametrize(("kind", "level"), [("tis", "token"), ("tis", "sequence"), ("mis", "token"), ("mis", "sequence")])
def test_correction_multiplies_each_token_loss_and_gradient(kind, level):
    w = correction_weights(kind, OLD, ENGINE, MASK, 2.0, level)
    loss, grad = loss_and_grad(w)
    adv = ADV.unsqueeze(-1).expand_as(OLD)
    # by hand: token loss -A w, summed over the scored tokens / the step's 8 tokens (masked tokens still count)
    close(loss, float((torch.where(MASK, -adv * w, 0.0)).sum()) / 8)
    close(grad, torch.where(MASK, -adv * w, 0.0) / 8)
    if kind == "mis" and level == "token":
        close(grad, [[-1 / 8, 0, 0, -1 / 8], [0, 0, 0, 0], [0, 0, 0, 0]])
    if kind == "tis" and level == "token":
        close(grad, [[-1 / 8, -2 / 8, -0.25 / 8, -1.5 / 8], [1 / 8, 1 / 8, 0, 0], [-4 / 8, -0.8 / 8, 0, 0]])


@pytest.mark.parametrize(("kind", "level"), [("tis", "token"), ("tis", "sequence"), ("mis", "token"), ("mis", "sequence")])
def test_correction_is_the_identity_when_engine_and_trainer_agree(kind, level):
    base = loss_and_grad(None)
    w = correction_weights(kind, OLD, OLD.clone(), MASK, 2.0, level)
    assert torch.equal(w, torch.ones_like(w))
    loss, grad = loss_and_grad(w)
    assert torch.equal(loss, base[0]) and torch.equal(grad, base[1])


def test_no_correction_without_engine_logprobs_or_with_none():
    assert correction_weights("none", OLD, ENGINE, MASK, 2.0, "token") is None
    assert correction_weights("tis", OLD, None, MASK, 2.0, "token") is None
    with pytest.raises(ValueError, match="none, tis, mis"):
        correction_weights("icepop", OLD, ENGINE, MASK, 2.0, "token")


# ---------------------------------------------------------------- a perturbed engine, through the recipe's path


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_a_perturbed_engine_raises_the_mismatch_and_mis_masks_exactly_its_tokens(shared_prefix):
    """The transformers engine samples from the policy's own weights, so its log-probs agree with the trainer's
    (mismatch ~0, nothing out of band). Shifting every third sampled token's log-prob by +1 (rho = e^-1, out of
    [1/2, 2]) raises rollout/mismatch_kl, and MIS drops exactly those tokens: in the micro-batch layout the
    trainer sees (engine log-probs placed like target_mask, both layouts) and in optimizer_step's count."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_fsdp import distributed
    from grpo_fsdp.attention import with_our_attention
    from grpo_fsdp.config import GRPOConfig, OptimConfig
    from grpo_fsdp.policy import Policy
    from grpo_fsdp.recipes.grpo_update import optimizer_step, score_logprobs
    from grpo_fsdp.recipes.rollout_batch import gather_rollout, micro_batches
    from grpo_fsdp.rollout import Completion, SamplingConfig
    from grpo_fsdp.rollout.hf import HFEngine
    from grpo_fsdp.schedule import build_scheduler

    conf = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                       bos_token_id=None, eos_token_id=1, initializer_range=0.1)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(with_our_attention(conf) if shared_prefix else conf)
    policy = Policy(hf, chunk_size=16)
    engine = HFEngine(conf, [1], 0)
    engine.load_weights(policy.named_parameters())
    prompts, group = [[5, 6, 7, 8], [9, 10]], 3
    temp = 0.9
    clean = engine.generate(prompts, SamplingConfig(n=group, temperature=temp, max_new_tokens=6, seed=3))
    shifted = {(i, t) for i, c in enumerate(clean) for t in range(len(c.token_ids)) if (i + t) % 3 == 0}
    perturbed = [Completion(c.prompt_index, c.token_ids, [lp + 1.0 if (i, t) in shifted else lp for t, lp in
                                                            enumerate(c.logprobs)], c.finish_reason)
                 for i, c in enumerate(clean)]
    assert shifted and sum(len(c.token_ids) for c in clean) > len(shifted)

    d = distributed.init("cpu")
    try:
        g = GRPOConfig(rollout_correction="mis", group_size=group, max_new_tokens=6, temperature=temp)
        results = {}
        for name, completions in (("clean", clean), ("perturbed", perturbed)):
            rollout = gather_rollout(completions, [float(i % 2) for i in range(len(completions))], prompts, group)
            adv = torch.linspace(-1, 1, len(completions))
            keep = torch.ones(len(completions), dtype=torch.bool)
            batches = micro_batches(rollout, adv, keep, range(len(completions)), 4, 0, False, shared_prefix)
            olds = score_logprobs(policy, batches, d.device, temp)
            masked = set()
            for b, old in zip(batches, olds):
                w = correction_weights("mis", old, b["engine_logp"], b["target_mask"], 2.0, "token")
                for row, col in (w == 0).logical_and(b["target_mask"]).nonzero().tolist():
                    i = int(b["index"][row])
                    start = 0 if shared_prefix else len(prompts[i // group]) - 1
                    masked.add((i, col - start))
            opt = torch.optim.SGD(policy.parameters(), lr=0.0)
            sums = optimizer_step(policy, opt, build_scheduler(opt, OptimConfig(lr=0.0, warmup_steps=0), 1), batches,
                                  None, None, g, 1.0, d.device, temp)
            results[name] = (sums, masked)
        clean_sums, clean_masked = results["clean"]
        sums, masked = results["perturbed"]
        assert clean_masked == set() and clean_sums["corrected"] == 0 and clean_sums["mismatch_outside"] == 0
        assert clean_sums["mismatch_kl"] / clean_sums["mismatch_tokens"] < 1e-9
        assert clean_sums["mismatch_abs_max"] < 1e-4
        assert masked == shifted  # exactly the shifted tokens
        assert sums["corrected"] == sums["mismatch_outside"] == len(shifted)
        # k3 at rho = e^-1 on the shifted tokens, ~0 elsewhere
        want = len(shifted) * (math.exp(-1) - 1 + 1) / sums["mismatch_tokens"]
        assert abs(sums["mismatch_kl"] / sums["mismatch_tokens"] - want) < 1e-4
        assert abs(sums["mismatch_abs_max"] - 1.0) < 1e-4
    finally:
        distributed.shutdown()


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("override", "field"), [
    ("algo.rollout_correction=icepop", "algo.rollout_correction"),
    ("algo.rollout_correction_cap=1.0", "algo.rollout_correction_cap"),
    ("algo.rollout_correction_level=group", "algo.rollout_correction_level"),
    ("algo.importance_level=sentence", "algo.importance_level"),
    ("algo.loss=gspo", "algo.loss"),
])
def test_bad_new_options_are_refused_naming_the_field(override, field):
    from grpo_fsdp.cli import compose
    from grpo_fsdp.config import ConfigError
    from grpo_fsdp.validation import validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["algo=grpo", "train.global_batch_size=128", override]), world_size=1, cuda_available=False)
    assert err.value.field_name == field and "; " in str(err.value)


def test_defaults_and_new_options_validate():
    from grpo_fsdp.cli import compose
    from grpo_fsdp.validation import validate

    cfg = compose(["algo=grpo", "train.global_batch_size=128"])
    g = cfg.algo
    assert (g.rollout_correction, g.rollout_correction_cap, g.rollout_correction_level, g.importance_level) == \
        ("tis", 2.0, "token", "token")
    validate(compose(["algo=grpo", "train.global_batch_size=128", "algo.loss=cispo", "algo.importance_level=sequence",
                      "algo.rollout_correction=mis", "algo.rollout_correction_level=sequence"]), world_size=1, cuda_available=False)
