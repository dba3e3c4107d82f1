"""One process without FSDP2 (parallelize.shards): at world size 1 with fp32 compute and no offload the policy is
not `fully_shard`ed, its parameters stay plain tensors; a bf16 or offload configuration still gets FSDP2. The two
kinds of checkpoint load into each other exactly (DCP keys are the same names), so a run that checkpointed under
FSDP2 before the change resumes without it; tied embeddings stay one parameter without FSDP2 too.
The 1-vs-2-rank parity tests (test_distributed.py, test_dpo_recipe.py, test_grpo_recipe.py, test_lora_recipe.py)
compare this plain path against FSDP2 on 2 ranks."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL
from torch.distributed.tensor import DTensor

from grpo_fsdp import distributed
from grpo_fsdp.checkpoint import Checkpointer
from grpo_fsdp.cli import compose
from grpo_fsdp.config import HardwareConfig
from grpo_fsdp.models import build_policy, build_reference, load_tokenizer
from grpo_fsdp.optim import build_optimizer
from grpo_fsdp.parallelize import is_sharded, shards
from grpo_fsdp.schedule import build_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 9, 14, 20, 7, 3], [8, 2, 2, 11, 60, 4]])


def test_fsdp2_only_where_it_does_something():
    """World size > 1, a lower compute dtype (FSDP2's cast) or CPU offload: FSDP2. One fp32 process: none."""
    assert not shards(HardwareConfig(), 1)
    assert not shards(HardwareConfig(reduce_dtype="bfloat16"), 1)  # fp32 parameters: reduce_dtype was never applied
    assert shards(HardwareConfig(), 2)
    assert shards(HardwareConfig(param_dtype="bfloat16"), 1)
    assert shards(HardwareConfig(param_dtype="float16"), 1)
    assert shards(HardwareConfig(cpu_offload=True), 1)


def _build(overrides: list[str], d):
    cfg = compose([*SMALL, *overrides])
    tok = load_tokenizer(cfg.model)
    policy, conf = build_policy(cfg.model, cfg.hardware, tok, d, cfg.train.seed, 64)
    return cfg, tok, policy, conf


def _logp(policy) -> torch.Tensor:
    return policy(input_ids=IDS, attention_mask=torch.ones_like(IDS), target_mask=torch.ones(2, 5, dtype=torch.bool))[0]


@pytest.mark.parametrize(("overrides", "sharded"), [([], False), (["hardware.param_dtype=bfloat16"], True),
                                                    (["hardware.cpu_offload=true"], True)],
                         ids=["cpu-profile", "bf16", "offload"])
def test_one_process_policy_is_plain_on_the_cpu_profile_and_fsdp2_otherwise(overrides, sharded):
    d = distributed.init("cpu")
    try:
        _, _, policy, _ = _build(overrides, d)
        fsdp_modules = [m for m in policy.modules() if is_sharded(m)]
        assert bool(fsdp_modules) is sharded and is_sharded(policy) is sharded
        assert {isinstance(p, DTensor) for p in policy.parameters()} == {sharded}
        _logp(policy).sum().backward()  # trains either way: every parameter gets its whole gradient
        assert all(p.grad is not None and distributed.full_tensor(p.grad).shape == p.shape for p in policy.parameters())
    finally:
        distributed.shutdown()


def test_tied_embeddings_stay_one_parameter_without_fsdp2():
    """Materialising a meta-built model module by module used to give `lm_head` a parameter of its own: two
    copies of the embedding, trained apart. The policy and its reference keep the tie."""
    d = distributed.init("cpu")
    try:
        cfg, _, policy, conf = _build(["model.arch.tie_embeddings=true"], d)
        assert not is_sharded(policy)
        assert policy.lm_head.weight is policy.model.embed_tokens.weight
        assert len(list(policy.parameters())) == len(dict(policy.named_parameters(remove_duplicate=False))) - 1
        reference = build_reference(policy, conf, cfg.model, cfg.hardware, d, 64)
        assert reference.lm_head.weight is reference.model.embed_tokens.weight
        torch.testing.assert_close(_logp(reference), _logp(policy).detach(), rtol=0, atol=0)
    finally:
        distributed.shutdown()


def _trained_state(policy) -> dict[str, torch.Tensor]:
    return {n: distributed.full_tensor(p.detach()).clone() for n, p in policy.named_parameters()}


def _moments(optimizer) -> list[torch.Tensor]:
    return [distributed.full_tensor(s[k]).clone() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("direction", ["fsdp2-to-plain", "plain-to-fsdp2"])
def test_checkpoints_of_either_kind_load_into_the_other_exactly(direction, tmp_path, monkeypatch):
    """A checkpoint written under FSDP2 in one process (every run before this change) resumes in the unsharded
    path, and the other way round: weights, AdamW moments and step equal to the last bit."""
    import grpo_fsdp.parallelize as par

    d = distributed.init("cpu")
    try:
        writer_sharded = direction == "fsdp2-to-plain"
        monkeypatch.setattr(par, "shards", lambda hw, world: writer_sharded)
        cfg, tok, policy, conf = _build([], d)
        assert is_sharded(policy) is writer_sharded
        optimizer = build_optimizer(policy.parameters(), cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 10)
        for _ in range(2):
            _logp(policy).sum().neg().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        saved = Checkpointer(tmp_path / "ckpt", keep_last=2).save(2, policy, optimizer, scheduler, 2, conf, tok)
        weights, moments = _trained_state(policy), _moments(optimizer)

        monkeypatch.setattr(par, "shards", lambda hw, world: not writer_sharded)
        cfg2, _, fresh, _ = _build(["train.seed=5"], d)  # other initial weights: the load must overwrite them all
        assert is_sharded(fresh) is not writer_sharded
        opt2 = build_optimizer(fresh.parameters(), cfg2.optim)
        sched2 = build_scheduler(opt2, cfg2.optim, 10)
        assert any(not torch.equal(weights[n], w) for n, w in _trained_state(fresh).items())
        state = Checkpointer(tmp_path / "ckpt", keep_last=2).load(saved, fresh, opt2, sched2)
        assert (state.step, sched2.last_epoch) == (2, 2)
        got = _trained_state(fresh)
        assert got.keys() == weights.keys() and all(torch.equal(got[n], weights[n]) for n in weights)
        again = _moments(opt2)
        assert len(again) == len(moments) > 0 and all(torch.equal(a, b) for a, b in zip(again, moments, strict=True))
    finally:
        distributed.shutdown()
