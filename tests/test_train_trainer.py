"""Trainer: resume reproduces the uninterrupted loss curve; AMP; clipping; metrics JSON."""

import json

import pytest
import torch
from tolerance import assert_within, bound
from torch import nn

from guidance_kernels.train import Guidance, NoiseWarmup, TrainConfig, Trainer
from guidance_kernels.train.models import DeepFCN, SmallCNN


def make(out_dir, amp=False, clip=None, steps=12):
    torch.manual_seed(0)
    t = DeepFCN(depth=5, width=16)
    g = SmallCNN(channels=4, hidden=8)
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear),
                 alpha=NoiseWarmup(k=4, value=1.0, then=None))
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(80, 1, 8, 8, generator=gen), torch.randint(0, 10, (80,), generator=gen)
    cfg = TrainConfig(steps=steps, batch_size=16, progress=False, eval_every=5, log_every=3,
                      checkpoint_every=5, out_dir=str(out_dir), amp=amp, grad_clip=clip)
    return Trainer(t, (X, Y), cfg, guidance=G, eval_data=(X[:32], Y[:32]))


@pytest.mark.parametrize("amp", [False, True])
def test_resume_reproduces_loss_curve(tmp_path, amp):
    full = make(tmp_path / "a", amp=amp, clip=1.0).fit()
    part = make(tmp_path / "b", amp=amp, clip=1.0)
    part.fit(max_steps=13)  # "crash" after step 13; the last checkpoint is at step 10
    resumed = make(tmp_path / "b", amp=amp, clip=1.0)
    h = resumed.fit(resume=True)
    assert resumed.step == 16 and h.step == list(range(16))
    for k in ("loss", "task", "guidance"):
        # the same steps replayed from the checkpoint: equal up to fp32 rounding of O(1) losses
        assert_within(torch.tensor(getattr(h, k)), torch.tensor(getattr(full, k)), dtype=torch.float32)
    assert [e["acc"] for e in h.eval] == [e["acc"] for e in full.eval]


def test_resume_without_checkpoint_differs_from_continuation(tmp_path):
    # the test above can fail: restarting from scratch at step 10 gives a different curve
    full = make(tmp_path / "a").fit()
    fresh = make(tmp_path / "c")
    fresh.fit(max_steps=10)
    assert fresh.history.loss[:10] == full.loss[:10]
    other = make(tmp_path / "d", steps=12)
    other.step = 10  # continue with untrained weights: not the same curve
    other.fit()
    assert max(abs(a - b) for a, b in zip(other.history.loss, full.loss[10:])) > 1e-4


def test_metrics_json_and_amp_dtype(tmp_path):
    tr = make(tmp_path, amp=True)
    dtypes = []
    tr.model[1].register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    tr.fit()
    assert torch.bfloat16 in dtypes
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["warmup_steps"] == 4 and len(data["history"]["loss"]) == 16
    assert all(map(lambda v: v == v, data["history"]["loss"]))  # finite, no NaN
    assert data["history"]["eval"][-1]["step"] == 16


def test_grad_clip_bounds_the_norm(tmp_path):
    tr = make(tmp_path, clip=1e-3)
    norms = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        out = orig(params, max_norm, *a, **k)
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        return out

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        tr.train_step(0)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    # the norm of the clipped gradient, itself an fp32 sum over every parameter entry
    n_params = sum(p.numel() for p in tr.model.parameters())
    assert norms and norms[0] <= 1e-3 * (1 + bound(torch.float32, n_params, c=1))
