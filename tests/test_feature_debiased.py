"""Debiased CKA in feature space (guidance_kernels.feature_debiased): equal to the sample-space
estimator and to the textbook fp64 reference, hand-written backward checked by gradcheck,
degenerate rules, the form choice, and memory without an n x n Gram."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import guidance_kernels as gk
from guidance_kernels.feature_debiased import debiased_cka_features, debiased_cka_features_plain
from reference_math import debiased_cka as dcka64
from tolerance import bound, rel, score_bound

F64, F32 = torch.float64, torch.float32


def _pair(n, p, q, seed=0, offset=0.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=F64)
    y = torch.randn(n, q, generator=g, dtype=F64) + 0.5 * x[:, :1]  # correlated
    return (x + offset).to(dtype), (y - 0.5 * offset).to(dtype)


@pytest.mark.parametrize("n,p,q", [(4, 3, 2), (9, 7, 5), (40, 6, 3), (300, 12, 20)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_fp64_equals_sample_form_and_reference(n, p, q, offset):
    x, y = _pair(n, p, q, offset=offset)
    got = debiased_cka_features(x, y)
    sample = gk.pair_scores([x], [y], metric="debiased_cka", form="sample")[0]
    feat = gk.pair_scores([x], [y], metric="debiased_cka", form="feature")[0]
    assert got.dtype == F64 and float(feat) == float(got)
    assert abs(float(got) - float(sample)) <= 1e-9
    assert abs(float(got) - float(dcka64(x, y))) <= 1e-9


@pytest.mark.parametrize("n,p,q", [(64, 16, 8), (1000, 24, 12)])
def test_fp32_with_large_offset_matches_reference(n, p, q):
    # offset 3e3 on unit-variance data: ||Kc|| / ||K|| ~ 1e-7 (the deep-layer regime)
    x, y = _pair(n, p, q, seed=1, offset=3e3, dtype=F32)
    got = debiased_cka_features(x, y)
    want = dcka64(x.double(), y.double())  # truth of the fp32-rounded inputs
    assert got.dtype == F32
    assert abs(float(got) - float(want)) <= score_bound("debiased_cka", F32, n, max(p, q))
    bf = debiased_cka_features(x.to(torch.bfloat16), y.to(torch.bfloat16))
    assert bf.dtype == F32 and torch.isfinite(bf)


@pytest.mark.parametrize("shape", [(4, 3, 2), (9, 7, 5), (12, 3, 2)])
def test_gradcheck_hand_written_backward(shape):
    x, y = (t.requires_grad_() for t in _pair(*shape, seed=2))
    assert gradcheck(debiased_cka_features, (x, y))
    assert gradcheck(lambda x: debiased_cka_features(x, y.detach()), (x,))
    assert gradgradcheck(debiased_cka_features, (x, y))


def test_gradient_equals_sample_form_and_plain_autograd():
    x, y = (t.requires_grad_() for t in _pair(50, 6, 9, seed=3, offset=10.0))
    gf = torch.autograd.grad(debiased_cka_features(x, y), (x, y))
    gs = torch.autograd.grad(gk.pair_scores([x], [y], metric="debiased_cka", form="sample")[0], (x, y))
    gp = torch.autograd.grad(debiased_cka_features_plain(x, y), (x, y))
    for a, b, c in zip(gf, gs, gp):
        assert rel(a, b) <= 1e-9 and rel(a, c) <= 1e-9


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
def test_blocked_fast_path_equals_plain_form(dtype, sym, monkeypatch):
    """The eager forward (reused row-block buffer, one symmetric product for A, B, C) and backward
    (one GEMM per block and side, written into dX's rows) over several row blocks, with and
    without ``?syrk``, against the plain differentiable form of the same inputs in fp64."""
    import guidance_kernels.feature_debiased as fd
    from guidance_kernels.backends import reference

    if not sym:
        monkeypatch.setattr(reference, "symmetric_cpu", lambda t, acc: False)
        monkeypatch.setattr(fd, "symmetric_cpu", lambda t, acc: False)
    monkeypatch.setattr(fd, "_BLOCK_ELEMS", 7 * 13)  # blocks of 7 rows, the last one short
    flags = []
    monkeypatch.setattr(fd, "add_zz_", lambda *a: (flags.append(a[3]), reference.add_zz_(*a)))
    x, y = _pair(61, 6, 7, seed=5, offset=30.0, dtype=dtype)
    x, y = x.requires_grad_(), y.requires_grad_()
    got = debiased_cka_features(x, y)
    gx, gy = torch.autograd.grad(got, (x, y))
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    want = debiased_cka_features_plain(x64, y64)
    wx, wy = torch.autograd.grad(want, (x64, y64))
    acc = F64 if dtype == F64 else F32
    assert gx.dtype == dtype and gy.dtype == dtype
    assert len(flags) == 9 and set(flags) == {sym and reference.cpu_syrk.available(acc)}
    assert abs(float(got) - float(want)) <= score_bound("debiased_cka", acc, 61, 7)
    # gradients: relative Frobenius error of n-term sums of (p + q)-term products in the
    # accumulation dtype, plus the final rounding to the input dtype
    k = bound(acc, 61 * 13) + torch.finfo(dtype).eps
    assert rel(gx.double(), wx) <= k and rel(gy.double(), wy) <= k


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, F64])
def test_degenerate_rules(dtype):
    y = torch.randn(10, 6).to(dtype)
    for x in (torch.full((10, 4), 0.7, dtype=dtype), torch.zeros(10, 5, dtype=dtype)):
        x = x.requires_grad_()
        v = debiased_cka_features(x, y)
        (gx,) = torch.autograd.grad(v, (x,))
        assert float(v.detach()) == 0.0 and float(gx.abs().max()) == 0.0
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(10, 1, generator=g) @ torch.randn(1, 9, generator=g)).to(dtype).requires_grad_()  # rank 1
    v = debiased_cka_features(x, y)
    (gx,) = torch.autograd.grad(v, (x,))
    assert torch.isfinite(v) and torch.isfinite(gx).all() and -1 - 1e-3 <= float(v) <= 1 + 1e-3
    if dtype == F64:  # rank 1 is a valid input: the true value
        assert abs(float(v) - float(dcka64(x, y))) <= 1e-9


def test_auto_form_uses_feature_space(monkeypatch):
    x, y = _pair(2000, 8, 4, seed=5)

    def no_gram(*a, **k):
        raise AssertionError("sample-space Gram built")

    monkeypatch.setattr(gk.ops, "gram", no_gram)
    v = gk.guidance_loss([x], [y], metric="debiased_cka")
    assert abs(float(1 - v) - float(dcka64(x, y))) <= 1e-9


def test_token_level_memory_has_no_n_squared_buffer():
    """n = 16384 tokens: an n x n fp32 Gram alone is 1 GiB; the feature form stays below 100 MB
    of extra peak resident memory (forward and backward), measured in a fresh process."""
    code = textwrap.dedent(
        """
        import resource, torch
        import guidance_kernels as gk
        torch.manual_seed(0)
        x = torch.randn(16384, 64, requires_grad=True)
        y = torch.randn(16384, 48)
        gk.guidance_loss([x[:64]], [y[:64]], metric="debiased_cka").backward()  # warm up
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        gk.guidance_loss([x], [y], metric="debiased_cka").backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 100, out.stdout


def test_per_token_debiased_guidance_of_a_language_model_builds_no_gram(monkeypatch):
    """Guidance(metric='debiased_cka', flatten='token') on a small sequence model: 4096 tokens of
    width 32 go through the feature form (an n x n Gram would be 64 MiB per layer)."""
    from torch import nn

    from guidance_kernels.train.guidance import Guidance

    torch.manual_seed(0)

    def lm():
        return nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Linear(32, 50))

    target, guide = lm(), lm()

    def no_gram(*a, **k):
        raise AssertionError("sample-space Gram built")

    monkeypatch.setattr(gk.ops, "gram", no_gram)
    g = Guidance(target, guide, target_layers=nn.Linear, guide_layers=nn.Linear, metric="debiased_cka", flatten="token")
    tokens = torch.randint(0, 50, (32, 128))
    with g.record():
        logits = target(tokens)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + g.loss(tokens)
    loss.backward()
    grads = [p.grad for p in target.parameters()]
    assert torch.isfinite(loss) and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
