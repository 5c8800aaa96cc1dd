"""The reference backend against independent fp64 math: value and gradient, every metric and
form, fresh random inputs of several (odd) shapes, by input dtype."""

import zlib

import pytest
import torch

import guidance_kernels as gk
from reference_math import METRIC_FNS
from tolerance import eps, score_bound

SHAPES = [  # (n, target shape per sample, guide shape per sample)
    (7, (5,), (9,)),
    (16, (3, 5, 5), (12,)),
    (33, (17,), (3, 7)),
    (64, (4, 3), (2, 2, 2)),  # n large vs p: feature space wins
]
F64 = torch.float64


def _tols(metric, dtype, n, p):
    """(value, gradient) bounds: the truth uses the same rounded inputs, so the error is the
    accumulation's (fp32 for fp32/fp16/bf16, fp64 for fp64; Procrustes always builds fp64 Grams)
    plus, for gradients, one rounding to the input dtype."""
    acc = F64 if dtype == F64 or "procrustes" in metric else torch.float32
    value = score_bound(metric, acc, n, p)
    return value, 16 * value + eps(dtype)


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
    tol, gtol = _tols(metric, dtype, n, max(x[0].numel(), y[0].numel()))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want)))
    assert gx.dtype == dtype and gy.dtype == dtype
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
    tol, gtol = _tols(metric, F64, n, 50)
    tol *= sum(weights)
    assert abs(float(loss.detach()) - float(want.detach())) <= tol
    for a, b in zip(grads, wgrads):
        assert _rel(a, b) <= gtol
    mean = gk.guidance_loss(xs, ys, metric=metric, weights=weights, reduction="mean")
    assert abs(float(mean.detach()) - float(want.detach()) / 4) <= tol / 4
    terms = gk.guidance_loss(xs, ys, metric=metric, weights=weights, reduction="none")
    assert terms.shape == (4,) and abs(float(terms.sum()) - float(want)) <= tol


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
    from tolerance import abs_scale, assert_within

    # fp64, 6 features then 9-term centering sums, against an explicit H K H (two 9-term products)
    assert_within(gk.centered_gram(x), h @ k @ h, dtype=F64, k=6 + 4 * 9, scale=abs_scale(x.reshape(9, -1)))
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
    tol = score_bound("cka", F64, 11, 30)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert abs(float(m[i, j]) - float(fn(x, y))) <= tol
    self_m = gk.cka_matrix(xs, debiased=debiased)
    assert float((self_m - self_m.T).abs().max()) <= tol
    assert float((torch.diagonal(self_m) - 1).abs().max()) <= tol


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
