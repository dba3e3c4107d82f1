"""Entropy-selective policy gradient (issue 16, item 1; algorithms/entropy_mask.py): the mask on a hand-made batch,
the loss by hand, 1 vs 2 processes, quantile 1.0 = today's loss, and the LM head's backward doing only the kept rows."""

import math
import os

import pytest
import torch

from grpo_fsdp.algorithms.entropy_mask import keep_count, mask_metrics, mask_sums, step_keep_masks, step_threshold
from grpo_fsdp.algorithms.grpo import count_contributions, grpo_loss

CPU = torch.device("cpu")

# two micro-batches of one optimizer step; 9.9 and 8.0 sit on padding (not scored) and must not count
MASKS = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool), torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)]
ENTS = [torch.tensor([[0.5, 2.0, 0.1, 9.9], [1.5, 0.7, 8.0, 8.0]]), torch.tensor([[0.3, 1.2, 2.5, 0.9]])]
# scored entropies, largest first: 2.5, 2.0, 1.5, 1.2, 0.9, 0.7, 0.5, 0.3, 0.1 (n = 9)


def test_keep_count_is_ceil_of_q_n_without_float_fuzz():
    assert [keep_count(10, 0.2), keep_count(9, 0.2), keep_count(5, 0.3), keep_count(3, 0.01), keep_count(0, 0.2)] == [2, 2, 2, 1, 0]
    assert keep_count(7, 1.0) == 7 and keep_count(100, 0.07) == 7  # 0.07 x 100 = 7.000000000000001 in floats


def test_hand_made_batch_keeps_exactly_the_expected_tokens():
    # q = 0.3: ceil(2.7) = 3 kept -> tau = the 3rd largest = 1.5: tokens 2.0, 1.5 (batch 0) and 2.5 (batch 1)
    keeps, tau = step_keep_masks(MASKS, ENTS, 0.3, 0.0, CPU)
    assert tau == 1.5
    assert keeps[0].tolist() == [[False, True, False, False], [True, False, False, False]]
    assert keeps[1].tolist() == [[False, False, True, False]]
    # q = 0.2: ceil(1.8) = 2 -> tau = 2.0
    keeps, tau = step_keep_masks(MASKS, ENTS, 0.2, 0.0, CPU)
    assert tau == 2.0 and [k.sum().item() for k in keeps] == [1, 1]
    # the absolute form: H >= 0.9 -> 2.0, 1.5, 1.2, 2.5, 0.9; padding (9.9, 8.0) never kept
    keeps, tau = step_keep_masks(MASKS, ENTS, 1.0, 0.9, CPU)
    assert tau == 0.9
    assert keeps[0].tolist() == [[False, True, False, False], [True, False, False, False]]
    assert keeps[1].tolist() == [[False, True, True, True]]
    # off (q = 1, threshold 0): every scored token, even an entropy a hair below 0
    keeps, _ = step_keep_masks([MASKS[1]], [torch.tensor([[-1e-7, 0.0, 1.0, 2.0]])], 1.0, 0.0, CPU)
    assert keeps[0].tolist() == MASKS[1].tolist()


def test_ties_at_the_threshold_are_all_kept_and_stats_add_up():
    mask = torch.ones(1, 5, dtype=torch.bool)
    ent = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0]])
    keeps, tau = step_keep_masks([mask], [ent], 0.4, 0.0, CPU)  # k = 2, tau = 2.0, three tokens at 2.0
    assert tau == 2.0 and keeps[0].tolist() == [[False, True, True, False, True]]
    s = mask_sums(mask, keeps[0], ent)
    assert s == {"scored": 5.0, "kept": 3.0, "kept_entropy": 6.0, "dropped_entropy": 1.5}
    m = mask_metrics({f"emask_{k}": v for k, v in s.items()}, [2.0, 1.0])
    assert m == {"train/entropy_threshold": 1.5, "train/entropy_kept_frac": 0.6, "train/entropy_kept_mean": 2.0,
                 "train/entropy_dropped_mean": 0.75}


def _loss_inputs():
    # ratio 1 (logp = old), so the surrogate of a token is -A of its row; d = ref - logp sets the k3 KL
    logp = torch.zeros(2, 3, requires_grad=True)
    d = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, -0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    keep = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return logp, d, mask, keep, torch.tensor([2.0, -1.0])


def test_masked_loss_by_hand_kl_on_every_token():
    logp, d, mask, keep, adv = _loss_inputs()
    beta = 0.5
    norm = {k: float(v) for k, v in count_contributions(mask).items()}  # 5 tokens, 2 rows
    keep_norm = {k: float(v) for k, v in count_contributions(keep).items()}  # 3 kept
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach() + d, adv, mask, beta=beta, aggregation="dapo",
                        normalisers=norm, keep=keep, keep_normalisers=keep_norm)
    kl = [math.expm1(x) - x for x in (0.1, -0.2, 0.3, 0.4, 0.0)]  # the 5 scored tokens
    want = (-2.0 - 2.0 + 1.0) / 3 + beta * sum(kl) / 5  # kept: (0,1) A=2, (0,2) A=2, (1,0) A=-1
    assert loss.item() == pytest.approx(want, abs=1e-7)
    loss.backward()
    # d/dlogp: -A / 3 on kept tokens (ratio' = 1), + beta (1 - e^d) / 5 on every scored token, 0 on padding
    g_kl = beta * (1 - torch.exp(d)) / 5
    want_grad = torch.where(mask, g_kl, 0.0) + torch.where(keep, -adv[:, None] / 3, 0.0)
    torch.testing.assert_close(logp.grad, want_grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_keeping_every_token_is_todays_loss(aggregation):
    """Quantile 1.0 is off in the recipe (no keep passed: the unchanged code path); a keep mask equal to the
    scored tokens gives the same loss and gradient to fp32 rounding, for every aggregation, KL on."""
    torch.manual_seed(0)
    logp = (torch.randn(3, 5) * 0.1 - 1).requires_grad_()
    old, ref = logp.detach() + torch.randn(3, 5) * 0.05, logp.detach() + torch.randn(3, 5) * 0.1
    mask = torch.rand(3, 5) > 0.3
    adv = torch.tensor([1.0, -0.5, 0.25])
    norm = {**{k: float(v) for k, v in count_contributions(mask).items()}, "max_completion_length": 5}
    kw = {"beta": 0.04, "aggregation": aggregation, "normalisers": norm}
    today, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    (g_today,) = torch.autograd.grad(today, logp)
    keeps, _ = step_keep_masks([mask], [torch.rand(3, 5)], 1.0, 0.0, CPU)
    masked, _ = grpo_loss(logp, old, ref, adv, mask, keep=keeps[0], keep_normalisers=norm, **kw)
    (g_masked,) = torch.autograd.grad(masked, logp)
    torch.testing.assert_close(masked, today, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_masked, g_today, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- 1 vs 2 processes


def _two_rank_worker(rank, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(1)  # every rank builds the same step, then takes its own rows
    step = _step()
    mine = slice(0, 2) if rank == 0 else slice(2, 5)  # an uneven split: 2 and 3 rows, different token counts
    tau, loss = _masked_step_loss(*([x[mine] for x in xs] for xs in step))
    t = torch.tensor([loss])
    dist.all_reduce(t)  # the step's loss: the sum of every rank's micro-batch losses
    results[rank] = (tau, t.item())
    dist.destroy_process_group()


def _step():
    # one optimizer step of 5 rows in two micro-batches (3 + 2 rows), ragged masks, distinct entropies
    masks = [torch.rand(5, 7) > 0.25, torch.rand(5, 7) > 0.4]
    ents = [torch.rand(5, 7) * 3, torch.rand(5, 7) * 3]
    logps = [torch.randn(5, 7) * 0.2 - 1, torch.randn(5, 7) * 0.2 - 1]
    olds = [lp + torch.randn(5, 7) * 0.05 for lp in logps]
    advs = [torch.randn(5), torch.randn(5)]
    return masks, ents, logps, olds, advs


def _masked_step_loss(masks, ents, logps, olds, advs):
    import torch.distributed as dist

    keeps, tau = step_keep_masks(masks, ents, 0.2, 0.0, CPU)
    counts = torch.tensor([float(sum(m.sum() for m in masks)), float(sum(k.sum() for k in keeps)),
                           float(sum(m.shape[0] for m in masks))], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    norm = {"global_tokens": counts[0].item(), "global_sequences": counts[2].item()}
    keep_norm = {**norm, "global_tokens": counts[1].item()}
    loss = 0.0
    for m, k, lp, old, a in zip(masks, keeps, logps, olds, advs):
        part, _ = grpo_loss(lp, old, None, a, m, aggregation="dapo", normalisers=norm, keep=k, keep_normalisers=keep_norm)
        loss += part.item()
    return tau, loss


@pytest.mark.usefixtures("one_thread")
def test_one_and_two_processes_give_the_same_threshold_and_loss(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    step = _step()
    tau1, loss1 = _masked_step_loss(*step)
    masks, ents = step[:2]
    scored = torch.cat([e[m] for e, m in zip(ents, masks)])
    assert tau1 == scored.sort(descending=True).values[math.ceil(0.2 * scored.numel()) - 1].item()
    with mp.Manager() as manager:
        results = manager.dict()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        got = dict(results)
    assert got[0][0] == got[1][0] == tau1  # exact: the same value of the same multiset
    assert got[0][1] == pytest.approx(loss1, rel=1e-6, abs=1e-7) and got[1][1] == got[0][1]


def test_step_threshold_needs_no_process_group_and_handles_an_empty_step():
    assert step_threshold(torch.tensor([3.0, 1.0, 2.0]), 0.5, CPU) == 2.0
    assert step_threshold(torch.zeros(0), 0.2, CPU) == math.inf


# ---------------------------------------------------------------- the LM head's backward


def _head_flops(fn):
    """2 m n k of every matmul that runs in fn, out= variants included (torch's FlopCounterMode skips aten.mm.out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_"):
                a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
                Count.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            elif name in ("matmul", "bmm", "linear", "baddbmm", "addmv", "mv"):
                raise AssertionError(f"uncounted matmul {func}")
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.flops


@pytest.mark.parametrize("with_entropy_loss", [False, True])
def test_head_backward_does_only_the_kept_rows_and_matches_the_masked_full_gradient(with_entropy_loss):
    """N = 40 tokens, 8 kept (q = 0.2): the backward's matmuls (logits' recompute, grad_h, grad_w: 3 x 2 N V H FLOPs)
    run on the 8 kept rows only, counted by torch's FLOP counter, and the gradients equal those of full fp64
    logits with the same mask. With an entropy term on 3 more rows, those rows are live too."""
    from grpo_fsdp.logprobs import chunked_token_logprobs

    torch.manual_seed(3)
    n, h, v = 40, 16, 301
    hid64, w64 = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    targets, adv = torch.randint(0, v, (n,)), torch.randn(n)
    with torch.no_grad():
        _, ent = chunked_token_logprobs(hid64.float(), w64.float(), targets, 64, with_entropy=True)
    (keep,), _ = step_keep_masks([torch.ones(1, n, dtype=torch.bool)], [ent[None]], 0.2, 0.0, CPU)
    keep = keep[0]
    ent_rows = torch.zeros(n, dtype=torch.bool)
    if with_entropy_loss:
        ent_rows[(~keep).nonzero()[:3, 0]] = True  # three dropped tokens carry an entropy-bonus gradient
    assert int(keep.sum()) == 8

    def loss_of(logp, e, use_mask):
        pg = torch.where(keep, logp * adv.to(logp.dtype), 0.0) if use_mask else logp * adv.to(logp.dtype)
        return pg.sum() + (torch.where(ent_rows, e, 0.0).sum() if with_entropy_loss else 0.0)

    def run(use_mask):
        hid, w = hid64.float().requires_grad_(), w64.float().requires_grad_()
        logp, e = chunked_token_logprobs(hid, w, targets, 64, with_entropy=True)
        loss = loss_of(logp, e, use_mask)
        flops = _head_flops(loss.backward)
        return flops, hid.grad, w.grad

    flops_masked, g_h, g_w = run(True)
    flops_full, _, _ = run(False)
    live = 8 + (3 if with_entropy_loss else 0)
    assert flops_full == 3 * 2 * n * v * h
    assert flops_masked == 3 * 2 * live * v * h  # 5x (40 / 8) less work without the entropy rows
    # the reference: full fp64 logits, the same masked loss, autograd
    hid, w = hid64.clone().requires_grad_(), w64.clone().requires_grad_()
    logp_all = (hid @ w.T).log_softmax(-1)
    ref_logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    loss_of(ref_logp, ref_ent, True).backward()
    torch.testing.assert_close(g_h, hid.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, w.grad.float(), rtol=1e-4, atol=1e-5)
    assert (g_h[~(keep | ent_rows)] == 0).all()  # dropped rows: exactly zero, not a tiny number


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides,field", [
    (["algo.entropy_top_quantile=0"], "algo.entropy_top_quantile"),
    (["algo.entropy_top_quantile=1.5"], "algo.entropy_top_quantile"),
    (["algo.entropy_threshold=-0.1"], "algo.entropy_threshold"),
    (["algo.entropy_top_quantile=0.2", "algo.entropy_threshold=0.5"], "algo.entropy_threshold"),
])
def test_bad_entropy_mask_settings_are_refused_at_start_up(overrides, field):
    from grpo_fsdp.cli import compose
    from grpo_fsdp.config import ConfigError
    from grpo_fsdp.validation import validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["algo=grpo", *overrides]), world_size=1, cuda_available=False)
    assert e.value.field_name == field, str(e.value)
    validate(compose(["algo=grpo", "algo.entropy_top_quantile=0.2"]), world_size=1, cuda_available=False)


# ---------------------------------------------------------------- the recipe's optimizer step


@pytest.mark.usefixtures("one_thread")
def test_optimizer_step_with_the_mask_off_is_todays_step_and_on_keeps_a_fifth():
    """recipes/grpo_update.py's optimizer_step on a small policy and a hand-made rollout: given pi_old's entropies with
    q = 1.0 (everything kept) its loss and gradient norm equal the step without them; with q = 0.2 a fifth of the
    scored tokens (ceil) are kept, every kept entropy >= tau > every dropped one, and the loss changes."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_fsdp import distributed
    from grpo_fsdp.config import GRPOConfig, OptimConfig
    from grpo_fsdp.policy import Policy
    from grpo_fsdp.recipes.grpo_update import old_policy_pass, optimizer_step
    from grpo_fsdp.recipes.rollout_batch import gather_rollout, micro_batches
    from grpo_fsdp.rollout import Completion
    from grpo_fsdp.schedule import build_scheduler

    conf = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                       bos_token_id=None, eos_token_id=1, initializer_range=0.1)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = Policy(AutoModelForCausalLM.from_config(conf), chunk_size=16)
    gen = torch.Generator().manual_seed(4)
    prompts, group = [[5, 6, 7], [9, 10]], 4
    completions = [Completion(i // group, torch.randint(2, 40, (3 + i % 5,), generator=gen).tolist(), [0.0] * (3 + i % 5),
                              "stop") for i in range(len(prompts) * group)]
    d = distributed.init("cpu")
    try:
        rollout = gather_rollout(completions, [float(i % 3 == 0) for i in range(8)], prompts, group)
        adv = torch.linspace(-1, 1, 8)
        batches = micro_batches(rollout, adv, torch.ones(8, dtype=torch.bool), range(8), 4, 0, False, False)
        _, (ents,) = old_policy_pass(policy, [batches], d.device, 1.0, need_old=False, need_entropy=True)

        def step(q, with_ents, batches=batches, ents=ents):
            g = GRPOConfig(group_size=group, rollout_correction="none", entropy_top_quantile=q, beta=0.0)
            opt = torch.optim.SGD(policy.parameters(), lr=0.0)
            return optimizer_step(policy, opt, build_scheduler(opt, OptimConfig(lr=0.0, warmup_steps=0), 1), batches,
                                  None, None, g, 0.0, d.device, 1.0, ents if with_ents else None)

        today, off = step(1.0, False), step(1.0, True)
        assert off["loss"] == pytest.approx(today["loss"], rel=1e-6, abs=1e-8)
        assert off["grad_norm"] == pytest.approx(today["grad_norm"], rel=1e-5)
        assert off["emask_kept"] == off["emask_scored"] == today["tokens"]
        on = step(0.2, True)
        scored = torch.cat([e[b["target_mask"]] for e, b in zip(ents, batches)])
        assert on["emask_scored"] == scored.numel() and on["emask_kept"] == math.ceil(0.2 * scored.numel())
        assert on["entropy_threshold"] == scored.sort(descending=True).values[int(on["emask_kept"]) - 1].item()
        m = mask_metrics({k: on[k] for k in on if k.startswith("emask_")}, [on["entropy_threshold"]])
        assert m["train/entropy_kept_mean"] >= m["train/entropy_threshold"] > m["train/entropy_dropped_mean"]
        assert abs(on["loss"] - today["loss"]) > 1e-6
        with pytest.raises(ValueError, match="needs pi_old's entropies"):  # two micro-batches: the recipe's pass is needed
            step(0.2, False)
        # one micro-batch: its own forward's entropies set the mask, the same step as with the separate pass
        whole = micro_batches(rollout, adv, torch.ones(8, dtype=torch.bool), range(8), 8, 0, False, False)
        _, (whole_ents,) = old_policy_pass(policy, [whole], d.device, 1.0, need_old=False, need_entropy=True)
        own, passed = step(0.2, False, whole), step(0.2, True, whole, whole_ents)
        assert own["emask_kept"] == passed["emask_kept"] == on["emask_kept"]
        assert own["entropy_threshold"] == pytest.approx(passed["entropy_threshold"], abs=1e-6)
        assert own["loss"] == pytest.approx(passed["loss"], rel=1e-6) == pytest.approx(on["loss"], rel=1e-5)
        assert own["grad_norm"] == pytest.approx(passed["grad_norm"], rel=1e-5)
    finally:
        distributed.shutdown()
