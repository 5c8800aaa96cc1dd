"""Hooks record the right tensors in the task forward; one forward per step; no leaked hooks."""

import pytest
import torch
from tolerance import assert_within, bound
from torch import nn

import guidance_kernels as gk
from guidance_kernels.train import KD, Guidance, TrainConfig, Trainer
from guidance_kernels.train.hooks import ActivationRecorder
from guidance_kernels.train.models import DeepFCN, SmallCNN


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def models(depth=6):
    torch.manual_seed(0)
    return DeepFCN(depth=depth, width=16), SmallCNN(channels=4, hidden=8)


def test_shapes_and_pairs():
    t, g = models()
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear))
    x = torch.randn(12, 1, 8, 8)
    with G.record():
        t(x)
    got = {n: v.shape for n, v in G._target_rec.outputs.items()}
    # 6 Linear layers, 4 guide layers -> targets 0, 2 (1.67 -> 2), 3, 5 of the Linear list
    lin = [n for n, m in t.named_modules() if isinstance(m, nn.Linear)]
    assert [p[0] for p in G.pairs] == [lin[0], lin[2], lin[3], lin[5]]
    assert got == {lin[0]: (12, 16), lin[2]: (12, 16), lin[3]: (12, 16), lin[5]: (12, 10)}
    gacts = G.guide_activations(x)
    assert [a.shape for a in gacts] == [(12, 4, 8, 8), (12, 8, 8, 8), (12, 8), (12, 10)]
    assert all(not a.requires_grad for a in gacts)
    G.close()


def test_loss_matches_manual_activations():
    t, g = models()
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear), alpha=0.5,
                 weights=[1.0, 2.0, 0.5, 1.0])
    x = torch.randn(20, 1, 8, 8)
    with G.record():
        t(x)
    got = G.loss(x, step=0)
    # manual: run the layers by hand
    lin = [m for m in t if isinstance(m, nn.Linear)]
    h, t_acts = x.flatten(1), []
    for i, m in enumerate(lin):
        h = m(h)
        t_acts.append(h)
        h = torch.relu(h)
    with torch.no_grad():
        c1 = g.conv1(x)
        c2 = g.conv2(torch.relu(c1))
        f1 = g.fc1(g.pool(torch.relu(c2)).flatten(1))
        f2 = g.fc2(torch.relu(f1))
    want = 0.5 * gk.guidance_loss([t_acts[0], t_acts[2], t_acts[3], t_acts[5]], [c1, c2, f1, f2],
                                  weights=[1.0, 2.0, 0.5, 1.0])
    # the same activations through the same loss, sums perhaps in another order (<= 256 terms)
    assert_within(got, want, dtype=torch.float32, k=256)
    G.close()


def test_gradients_reach_target_only_and_guide_mode_restored():
    t, g = models()
    g.train()
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=nn.Conv2d)
    x = torch.randn(16, 1, 8, 8)
    seen = []
    g.conv1.register_forward_hook(lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    with G.record():
        t(x)
    G.loss(x).backward()
    assert seen == [(False, False)]  # guide ran in eval mode under no_grad
    assert g.training  # and its mode was restored
    assert all(p.grad is None for p in g.parameters())
    assert all(m.weight.grad is not None for m in t if isinstance(m, nn.Linear))


def test_one_forward_per_step_in_trainer():
    t, g = models()
    calls = {"t": 0, "g": 0, "teacher": 0}
    t.register_forward_pre_hook(lambda m, a: calls.__setitem__("t", calls["t"] + 1))
    g.register_forward_pre_hook(lambda m, a: calls.__setitem__("g", calls["g"] + 1))
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear))
    X, Y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    tr = Trainer(t, (X, Y), TrainConfig(steps=3, batch_size=16, progress=False, eval_every=0), guidance=G)
    for s in range(3):
        tr.train_step(s)
    assert calls == {"t": 3, "g": 3, "teacher": 0}
    G.close()


def test_no_leaked_hooks_after_close():
    t, g = models()
    before = (hook_count(t), hook_count(g))
    with Guidance(t, g, target_layers=nn.Linear, guide_layers="auto") as G:
        assert hook_count(t) > before[0] and hook_count(g) > before[1]
        with G.record():
            t(torch.randn(4, 1, 8, 8))
        G.loss(torch.randn(4, 1, 8, 8))
    assert (hook_count(t), hook_count(g)) == before
    with pytest.raises(RuntimeError, match="closed"):
        with G.record():
            pass


def test_nothing_recorded_outside_record():
    t, g = models()
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=nn.Conv2d)
    t(torch.randn(4, 1, 8, 8))
    assert G._target_rec.outputs == {}
    with pytest.raises(RuntimeError, match="did not run"):
        G.loss(torch.randn(4, 1, 8, 8))
    G.close()


def test_shared_module_twice_is_an_error():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    rec = ActivationRecorder(model, ["0"])
    with pytest.raises(RuntimeError, match="ran twice"):
        with rec.recording():
            model(torch.randn(3, 4))
    rec.close()


def test_token_flattening():
    class Seq(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a = nn.Linear(d, d)
            self.b = nn.Linear(d, d)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    t, g = Seq(8), Seq(6)
    x = torch.randn(3, 5, 8)
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=nn.Linear, flatten="token",
                 guide_input=lambda z: z[..., :6])
    with G.record():
        t(x)
    terms = G.terms(x)
    want = gk.guidance_loss([t.a(x).reshape(15, 8), t(x).reshape(15, 8)],
                            [g.a(x[..., :6]).reshape(15, 6), g(x[..., :6]).reshape(15, 6)], reduction="none")
    assert_within(terms, want.detach(), dtype=torch.float32, k=15 * 15 + 8)
    G.close()


def test_kd_untrained_teacher_and_zero_alpha():
    t, g = models()
    kd = KD(g, temperature=2.0)
    x = torch.randn(8, 1, 8, 8)
    out = t(x)
    l = kd.loss(x, out)
    assert l.ndim == 0 and l.item() >= 0
    same = kd.loss(x, g(x).detach())
    assert same.abs().item() <= bound(torch.float32, 10)  # KD of the teacher against itself: 0 (10 classes)
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=nn.Conv2d, alpha=0.0)
    with G.record():
        t(x)
    assert G.loss(x).item() == 0.0
    G.close()


def test_bad_options():
    t, g = models()
    with pytest.raises(ValueError, match="metric"):
        Guidance(t, g, metric="cca")
    with pytest.raises(ValueError, match="weights"):
        Guidance(t, g, target_layers=nn.Linear, guide_layers=nn.Conv2d, weights=[1.0])
    with pytest.raises(ValueError, match="gather"):
        Guidance(t, g, gather="all")
