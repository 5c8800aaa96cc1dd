"""gradcheck / gradgradcheck in float64 for every op and both forms."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import guidance_kernels as gk
from guidance_kernels import ops


def _inputs(n=9, p=7, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, q, generator=g, dtype=torch.float64, requires_grad=True)
    return x, y


CASES = [
    ("cka", "sample"),
    ("cka", "feature"),
    ("debiased_cka", "sample"),
    ("procrustes", "sample"),
    ("angular_procrustes", "sample"),
]


@pytest.mark.parametrize("metric,form", CASES)
@pytest.mark.parametrize("shape", [(9, 7, 5), (6, 20, 3), (12, 3, 2)])
def test_gradcheck_loss(metric, form, shape):
    x, y = _inputs(*shape)
    assert gradcheck(lambda x, y: gk.guidance_loss([x], [y], metric=metric, form=form), (x, y))


@pytest.mark.parametrize("metric,form", [c for c in CASES if "procrustes" not in c[0]])
def test_gradgradcheck_loss(metric, form):
    x, y = _inputs()
    assert gradgradcheck(lambda x, y: gk.guidance_loss([x], [y], metric=metric, form=form), (x, y))


def test_gradcheck_gram_ops():
    x, y = _inputs()
    f = lambda x, y: ops.gram([x, y], "reference")  # noqa: E731
    assert gradcheck(f, (x, y))
    assert gradgradcheck(f, (x, y))
    f = lambda x, y: ops.gram([x, y], "reference")[1]  # only one layer's output used  # noqa: E731
    assert gradcheck(f, (x, y))
    f = lambda y: ops.gram([x.detach(), y], "reference")  # only the second layer needs a grad  # noqa: E731
    assert gradcheck(f, (y,))
    m = torch.randn(2, 9, 9, dtype=torch.float64, requires_grad=True)
    f = lambda m, x, y: tuple(ops.gram_backward(m, [x, y], "reference"))  # noqa: E731
    assert gradcheck(f, (m, x, y))
    assert gradgradcheck(f, (m, x, y))


def test_gradcheck_cross_ops():
    x, y = _inputs()
    x2, y2 = _inputs(seed=1)
    f = lambda x, y, x2, y2: ops.cross([x, x2], [y, y2], "reference")  # noqa: E731
    assert gradcheck(f, (x, y, x2, y2))
    assert gradgradcheck(f, (x, y, x2, y2))
    f = lambda x, y, x2: ops.cross([x, x2], [y, y], "reference")  # the second y needs no grad  # noqa: E731
    assert gradcheck(f, (x, y, x2.detach().requires_grad_(False)))
    m = torch.randn(2, 7, 7, dtype=torch.float64, requires_grad=True)
    nn_ = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    f = lambda x, m, y, nn_, v, x2, y2: tuple(ops.cross_backward([x, x2], m, [y, y2], nn_, v, "reference"))  # noqa: E731
    assert gradcheck(f, (x, m, y, nn_, v, x2, y2))
    assert gradgradcheck(f, (x, m, y, nn_, v, x2, y2))


def test_gradcheck_centered_gram_and_matrix():
    x, y = _inputs()
    assert gradcheck(lambda x: gk.centered_gram(x), (x,))
    assert gradcheck(lambda x, y: gk.cka_matrix([x, y]), (x, y))
    assert gradcheck(lambda x, y: gk.cka_matrix([x, y], debiased=True), (x, y))


def test_procrustes_gradient_finite_on_rank_deficient_input():
    # rank 2 target against rank 1 guide: repeated zero eigenvalues everywhere
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10, 2, generator=g) @ torch.randn(2, 30, generator=g)).requires_grad_()
    y = torch.randn(10, 1, generator=g) @ torch.randn(1, 8, generator=g)
    y = torch.cat([y, y], 0)[:10].requires_grad_()
    for angular in (False, True):
        d = gk.procrustes(x, y, angular=angular)
        gx, gy = torch.autograd.grad(d, (x, y))
        assert torch.isfinite(d) and torch.isfinite(gx).all() and torch.isfinite(gy).all()
