"""Issue 15 item 2: each DPO loss against values computed by hand here, with gradients; ln 2 at policy = reference."""

import math

import pytest
import torch

from grpo_fsdp.algorithms.dpo import LOSSES, pair_losses, sequence_logps, step_loss

# one pair: log pi(chosen) = -3, log pi(rejected) = -5, log ref(chosen) = -4, log ref(rejected) = -4.5,
# chosen 4 tokens, rejected 2 tokens, beta = 0.5  ->  x_c = 1, x_r = -0.5 (sums); 0.25, -0.25 (means)
PC, PR, RC, RR, LC, LR, BETA = -3.0, -5.0, -4.0, -4.5, 4.0, 2.0, 0.5


def _softplus(x: float) -> float:  # -log sigma(-x)
    return math.log1p(math.exp(x))


def _one(loss: str, eps: float = 0.0):
    pc, pr = torch.tensor([PC], dtype=torch.float64, requires_grad=True), torch.tensor([PR], dtype=torch.float64, requires_grad=True)
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    out, rc, rr = pair_losses(loss, pc, pr, t(RC), t(RR), t(LC), t(LR), BETA, eps)
    out.sum().backward()
    return out.item(), rc.item(), rr.item(), pc.grad.item(), pr.grad.item()


def test_sigmoid_by_hand():
    h = 0.5 * (1 - (-0.5))  # 0.75
    loss, rc, rr, gc, gr = _one("sigmoid")
    assert loss == pytest.approx(_softplus(-h), abs=1e-12)  # -log sigma(0.75)
    assert (rc, rr) == (pytest.approx(0.5), pytest.approx(-0.25))  # beta * x
    sig_neg = 1 / (1 + math.exp(h))  # d/dh -log sigma(h) = -sigma(-h)
    assert gc == pytest.approx(-BETA * sig_neg, abs=1e-12) and gr == pytest.approx(BETA * sig_neg, abs=1e-12)


def test_dpo_norm_uses_per_token_means():
    h = 0.5 * (1 / 4 - (-0.5) / 2)  # 0.25
    loss, rc, rr, gc, gr = _one("dpo_norm")
    assert loss == pytest.approx(_softplus(-h), abs=1e-12)
    assert (rc, rr) == (pytest.approx(0.125), pytest.approx(-0.125))
    sig_neg = 1 / (1 + math.exp(h))
    assert gc == pytest.approx(-BETA * sig_neg / 4, abs=1e-12) and gr == pytest.approx(BETA * sig_neg / 2, abs=1e-12)


def test_ipo_by_hand():
    loss, _, _, gc, gr = _one("ipo")  # (x_c - x_r - 1/(2 beta))^2 = (1.5 - 1)^2
    assert loss == pytest.approx(0.25, abs=1e-12)
    assert gc == pytest.approx(1.0, abs=1e-12) and gr == pytest.approx(-1.0, abs=1e-12)  # 2 (1.5 - 1) * (+-1)


def test_label_smoothing_cdpo_and_robust_by_hand():
    h, eps = 0.75, 0.1
    cdpo, *_ = _one("sigmoid", eps)
    assert cdpo == pytest.approx(0.9 * _softplus(-h) + 0.1 * _softplus(h), abs=1e-12)
    robust, *_ = _one("robust", eps)
    assert robust == pytest.approx((0.9 * _softplus(-h) - 0.1 * _softplus(h)) / 0.8, abs=1e-12)
    plain, *_ = _one("sigmoid")
    assert _one("robust", 0.0)[0] == pytest.approx(plain, abs=1e-15)  # eps = 0: both are DPO


@pytest.mark.parametrize("loss", ["sigmoid", "dpo_norm", "robust"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_policy_equal_to_reference_gives_ln2(loss, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr = -30 * torch.rand(64, generator=g), -30 * torch.rand(64, generator=g)
    lc, lr = torch.randint(1, 50, (64,), generator=g).float(), torch.randint(1, 50, (64,), generator=g).float()
    per_pair, rc, rr = pair_losses(loss, pc, pr, pc.clone(), pr.clone(), lc, lr, 5.0, eps)
    assert torch.all(per_pair == per_pair[0]) and per_pair[0].item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.all(rc == 0) and torch.all(rr == 0)
    # aggregated over micro-batches by the global pair count: the step loss is ln 2, not k ln 2
    assert (step_loss(per_pair[:40], 64) + step_loss(per_pair[40:], 64)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ipo_at_reference_is_the_squared_margin():
    z = torch.zeros(3)
    per_pair, _, _ = pair_losses("ipo", z, z, z, z, z + 1, z + 1, 0.25, 0.0)
    assert torch.allclose(per_pair, torch.full((3,), 4.0))  # (0 - 1/(2 * 0.25))^2


def test_sequence_logps_and_step_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -8.0, -16.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    s, n = sequence_logps(logp, mask)
    assert s.tolist() == [-3.0, -0.5] and n.tolist() == [2.0, 1.0]
    per_pair = torch.tensor([0.6, 1.0])
    assert step_loss(per_pair, 4).item() == pytest.approx(0.4)  # (0.6 + 1.0) / 4 pairs in the step
    # SFT term: 0.5 * (chosen NLL 6 over this micro-batch) / 12 chosen tokens in the step
    assert step_loss(per_pair, 4, torch.tensor(6.0), 12, 0.5).item() == pytest.approx(0.4 + 0.25)
    assert step_loss(per_pair, 4, torch.tensor(6.0), 12, 0.0).item() == pytest.approx(0.4)


def test_unknown_loss_is_refused():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        pair_losses("hinge", z, z, z, z, z, z, 1.0)
    assert set(LOSSES) == {"sigmoid", "dpo_norm", "ipo", "robust"}
