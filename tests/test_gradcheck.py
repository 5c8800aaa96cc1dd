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
    f = lambda x, y: tuple(ops.gram([x, y], "reference"))  # noqa: E731
    assert gradcheck(f, (x, y))
    assert gradgradcheck(f, (x, y))
    m = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
    f = lambda m, x: ops.gram_backward([m], [x], "reference")[0]  # noqa: E731
    assert gradcheck(f, (m, x))
    assert gradgradcheck(f, (m, x))


def test_gradcheck_cross_ops():
    x, y = _inputs()
    f = lambda x, y: tuple(t[0] for t in ops.cross([x], [y], "reference"))  # noqa: E731
    assert gradcheck(f, (x, y))
    assert gradgradcheck(f, (x, y))
    m = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    nn_ = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, dtype=torch.float64, requires_grad=True)
    f = lambda x, m, y, nn_, v: ops.cross_backward([x], [m], [y], [nn_], [v], "reference")[0]  # noqa: E731
    assert gradcheck(f, (x, m, y, nn_, v))
    assert gradgradcheck(f, (x, m, y, nn_, v))


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
