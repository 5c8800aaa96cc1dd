"""Schedules switch at the right step, in isolation and inside the trainer."""

import pytest
import torch
from torch import nn

from guidance_kernels.train import (AlphaDecay, Continuous, FirstK, Guidance, NoiseWarmup,
                                    TrainConfig, Trainer)
from guidance_kernels.train.models import DeepFCN, SmallCNN


def test_first_k():
    s = FirstK(k=300, value=2.0)
    assert [s.alpha(i) for i in (0, 299, 300, 1000)] == [2.0, 2.0, 0.0, 0.0]
    assert s.phase(0) == "task" and s.active(299) and not s.active(300)


def test_noise_warmup():
    s = NoiseWarmup(k=5, value=1.5)
    assert [s.phase(i) for i in range(7)] == ["noise"] * 5 + ["task"] * 2
    assert [s.alpha(i) for i in range(7)] == [1.5] * 5 + [0.0] * 2
    s2 = NoiseWarmup(k=5, value=1.0, then=FirstK(k=3, value=0.25))
    assert [s2.alpha(i) for i in range(10)] == [1.0] * 5 + [0.25] * 3 + [0.0] * 2


def test_alpha_decay():
    for kind in ("linear", "cosine"):
        s = AlphaDecay(value=1.0, steps=10, final=0.0, kind=kind)
        vals = [s.alpha(i) for i in range(12)]
        assert vals[0] == 1.0 and vals[10] == vals[11] == 0.0
        assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert AlphaDecay(steps=10, kind="linear").alpha(5) == pytest.approx(0.5)
    e = AlphaDecay(value=1.0, steps=10, final=0.01, kind="exp")
    assert e.alpha(5) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        AlphaDecay(kind="step")
    assert Continuous(0.3).alpha(10**6) == 0.3


def _trainer(schedule, steps=8):
    torch.manual_seed(0)
    t, g = DeepFCN(depth=4, width=16), SmallCNN(channels=4, hidden=8)
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear), alpha=schedule)
    X, Y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    seen = []
    t.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    cfg = TrainConfig(steps=steps, batch_size=16, progress=False, eval_every=0, log_every=3)
    return Trainer(t, (X, Y), cfg, guidance=G), X, seen


def test_trainer_first_k_switches():
    tr, _, _ = _trainer(FirstK(k=3))
    h = tr.fit()
    assert h.step == list(range(8))
    assert all(v > 0 for v in h.guidance[:3]) and all(v == 0 for v in h.guidance[3:])
    assert all(v > 0 for v in h.task)


def test_trainer_noise_warmup_switches():
    tr, X, seen = _trainer(NoiseWarmup(k=4))
    h = tr.fit()
    assert tr.total == 12 and h.step == list(range(12))
    assert all(v == 0 for v in h.task[:4]) and all(v > 0 for v in h.task[4:])
    assert all(v > 0 for v in h.guidance[:4]) and all(v == 0 for v in h.guidance[4:])
    # warm-up batches are noise, not training rows; task batches are training rows
    rows = {tuple(r.flatten().tolist()) for r in X}
    assert not any(tuple(r.flatten().tolist()) in rows for b in seen[:4] for r in b)
    assert all(tuple(r.flatten().tolist()) in rows for b in seen[4:12] for r in b)
