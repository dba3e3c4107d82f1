"""Counter-based sampling noise: Exp(1) distributed, independent across coordinates, reproducible."""

import math

import torch

from grpo_fsdp.rollout.noise import exponential_noise, mix32, stream_ids


def test_mix32_is_a_bijection_on_a_block():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65_537
    assert mix32(x).unique().numel() == x.numel()
    assert int(mix32(torch.tensor(0))) == 0 and int(mix32(torch.tensor(1))) != 1


def test_noise_is_exponential_and_uncorrelated():
    streams = torch.tensor(stream_ids(5, list(range(64)), [0] * 64))
    e = torch.cat([exponential_noise(streams, t, 1000) for t in range(4)]).double()  # 256k draws
    # Exp(1): mean 1, variance 1, P(E > 1) = 1/e; standard errors 1/sqrt(n) ~ 0.002
    assert abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.02
    assert abs((e > 1).double().mean().item() - math.exp(-1)) < 0.005
    # neighbours along the vocabulary, across steps and across streams are uncorrelated
    flat = e.reshape(4, 64, 1000)
    for a, b in ((flat[..., :-1], flat[..., 1:]), (flat[:-1], flat[1:]), (flat[:, :-1], flat[:, 1:])):
        r = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
        assert abs(r) < 0.01, r


def test_streams_depend_on_seed_key_and_index():
    a = stream_ids(1, [7, 7, 8], [0, 1, 0])
    assert len(set(a)) == 3
    assert stream_ids(1, [7, 7, 8], [0, 1, 0]) == a
    assert stream_ids(2, [7, 7, 8], [0, 1, 0]) != a
    assert stream_ids(1 + (1 << 32), [7], [0]) != stream_ids(1, [7], [0])  # high seed bits count
    s = torch.tensor(a)
    assert torch.equal(exponential_noise(s, 3, 50)[1], exponential_noise(s[1:2], 3, 50)[0])
