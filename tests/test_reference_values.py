"""The reference backend against independent fp64 math: value and gradient, every metric and
form, fresh random inputs of several (odd) shapes, by input dtype."""

import zlib

import pytest
import torch

import guidance_kernels as gk
from reference_math import METRIC_FNS

SHAPES = [  # (n, target shape per sample, guide shape per sample)
    (7, (5,), (9,)),
    (16, (3, 5, 5), (12,)),
    (33, (17,), (3, 7)),
    (64, (4, 3), (2, 2, 2)),  # n large vs p: feature space wins
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Procrustes gradients pass through an eigendecomposition of the fp32-accumulated Grams, which
# amplifies their rounding by the spectrum's conditioning: measured up to 1.6e-5 relative over
# 60 random fp32 inputs of these shapes (values stay within 1e-6). Every other case uses TOL.
PROCRUSTES_FP32_GRAD_TOL = 5e-5


def _forms(metric):
    return ["sample", "feature"] if metric == "cka" else ["sample"]


def _cases():
    for metric in METRIC_FNS:
        for form in _forms(metric):
            for shape in SHAPES:
                yield metric, form, shape


def _rel(a, b):
    return (a - b).abs().max() / b.abs().max().clamp_min(1e-30)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric,form,shape", list(_cases()))
def test_value_and_gradient_match_fp64(metric, form, shape, dtype):
    n, ps, qs = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr((metric, form, shape, dtype)).encode()))
    x = torch.randn(n, *ps, generator=g).to(dtype).requires_grad_()
    y = torch.randn(n, *qs, generator=g).to(dtype).requires_grad_()
    got = gk.pair_scores([x], [y], metric=metric, form=form, backend="reference")[0]
    gx, gy = torch.autograd.grad(got, (x, y))
    got = got.detach()
    # fp64 truth on exactly the same (rounded) input values
    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    want = METRIC_FNS[metric](x64, y64)
    wx, wy = torch.autograd.grad(want, (x64, y64))
    want = want.detach()
    tol = TOL[dtype]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want)))
    assert gx.dtype == dtype and gy.dtype == dtype
    gtol = PROCRUSTES_FP32_GRAD_TOL if "procrustes" in metric and dtype == torch.float32 else tol
    assert _rel(gx.double(), wx) <= gtol
    assert _rel(gy.double(), wy) <= gtol


@pytest.mark.parametrize("metric", list(METRIC_FNS))
def test_many_pairs_one_call_match_fp64(metric):
    g = torch.Generator().manual_seed(1)
    n = 12
    xs = [torch.randn(n, p, generator=g, dtype=torch.float64, requires_grad=True) for p in (3, 20, 7, 50)]
    ys = [torch.randn(n, q, generator=g, dtype=torch.float64) for q in (11, 2, 7, 13)]
    weights = [0.5, 1.0, 2.0, 0.25]
    loss = gk.guidance_loss(xs, ys, metric=metric, weights=weights)
    grads = torch.autograd.grad(loss, xs)
    xs64 = [x.detach().clone().requires_grad_() for x in xs]
    sim = metric in ("cka", "debiased_cka")
    want = sum(
        w * ((1 - METRIC_FNS[metric](x, y)) if sim else METRIC_FNS[metric](x, y))
        for w, x, y in zip(weights, xs64, ys)
    )
    wgrads = torch.autograd.grad(want, xs64)
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-10
    for a, b in zip(grads, wgrads):
        assert _rel(a, b) < 1e-10
    mean = gk.guidance_loss(xs, ys, metric=metric, weights=weights, reduction="mean")
    assert abs(float(mean.detach()) - float(want.detach()) / 4) < 1e-10
    terms = gk.guidance_loss(xs, ys, metric=metric, weights=weights, reduction="none")
    assert terms.shape == (4,) and abs(float(terms.sum()) - float(want)) < 1e-10


def test_guide_gets_gradient_only_when_it_requires_one():
    x = torch.randn(10, 6, requires_grad=True)
    y = torch.randn(10, 4)
    gk.guidance_loss([x], [y]).backward()
    assert x.grad is not None and y.grad is None
    y.requires_grad_()
    gk.guidance_loss([x], [y]).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_centered_gram_matches_explicit_hkh():
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    h = torch.eye(9, dtype=torch.float64) - 1 / 9
    k = x.reshape(9, -1) @ x.reshape(9, -1).T
    torch.testing.assert_close(gk.centered_gram(x), h @ k @ h, rtol=1e-12, atol=1e-12)
    assert gk.centered_gram(x.float()).dtype == torch.float32


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_matches_pairwise_fp64(debiased):
    from reference_math import cka, debiased_cka

    fn = debiased_cka if debiased else cka
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(11, p, generator=g, dtype=torch.float64) for p in (4, 9, 30)]
    ys = [torch.randn(11, q, generator=g, dtype=torch.float64) for q in (5, 13)]
    m = gk.cka_matrix(xs, ys, debiased=debiased)
    assert m.shape == (3, 2)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert abs(float(m[i, j]) - float(fn(x, y))) < 1e-10
    self_m = gk.cka_matrix(xs, debiased=debiased)
    torch.testing.assert_close(self_m, self_m.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(self_m), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_cka_matrix_computes_each_gram_once(monkeypatch):
    from guidance_kernels import functional

    calls = []
    real = functional.ops.gram

    def counting_gram(xs, backend):
        calls.append(len(xs))
        return real(xs, backend)

    monkeypatch.setattr(functional.ops, "gram", counting_gram)
    xs = [torch.randn(8, 5) for _ in range(3)]
    gk.cka_matrix(xs)
    gk.cka_matrix(xs, [xs[0], torch.randn(8, 2)])
    assert calls == [3, 4]
