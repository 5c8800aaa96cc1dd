"""``guidance_kernels::cross`` / ``cross_backward``: the feature-space products ``x'ᵀx'``,
``y'ᵀy'``, ``x'ᵀy'`` and column sums of the row-shifted activations, and
``dx = x' m + y' n + 1 vᵀ`` (``docs/design.md``). Math: ``backends/reference.py``; kernels:
``kernels/triton_forward.py``, ``kernels/triton_backward.py``, ``csrc/cross_fwd.cu``,
``csrc/cross_bwd.cu``; autograd: ``ops/products.py``.

First the contract on every backend available here, then each kernel backend's own checks
(Triton with tiny tiles, CUDA on the awkward layers on a GPU)."""

from __future__ import annotations

import pytest
import torch

from guidance_kernels.backends import cuda as cb
from guidance_kernels.backends import get_backend
from guidance_kernels.planning import acc_dtype
from helpers import (
    DTYPES, TRITON_DIRECT, TRITON_SMALL, TRITON_SPLIT, awkward_layers, backend_params, close, cuda_prod_tol,
    cuda_ready, device, fp64, partners, products, rel, sh, shifted, small_layers, triton_or_skip,
)
from tolerance import abs_product, frob_bound

cuda_ready = cuda_ready()


# --------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_cross_and_backward_every_backend(backend, dtype):
    """The backend's products vs fp64 products of the same (rounded) inputs, row-shifted."""
    b = get_backend(backend)
    xs = small_layers(dtype)
    ys = partners(xs, dtype)
    outs = b.cross(xs, ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X, Y = sh(x), sh(y)
        for j, (want, _) in enumerate(products(X, Y)):
            assert outs[j][i].dtype == acc_dtype(dtype) and outs[j][i].shape == want.shape
            assert rel(outs[j][i], want) <= frob_bound(dtype, X.shape[0]), (i, j)
    g = torch.Generator().manual_seed(4)
    acc = acc_dtype(dtype)
    ms = [torch.randn(x.shape[1], x.shape[1], generator=g).to(device(), acc) for x in xs]
    ns = [torch.randn(y.shape[1], x.shape[1], generator=g).to(device(), acc) for x, y in zip(xs, ys)]
    vs = [torch.randn(x.shape[1], generator=g).to(device(), acc) for x in xs]
    for d, x, m, y, n_, v in zip(b.cross_backward(xs, ms, ys, ns, vs), xs, ms, ys, ns, vs):
        assert d.dtype == dtype and d.shape == x.shape
        want = sh(x) @ fp64(m) + sh(y) @ fp64(n_) + fp64(v)
        assert rel(d, want) <= frob_bound(dtype, x.shape[1] + y.shape[1] + 1)


# --------------------------------------------------------------------------- triton, tiny tiles
@pytest.mark.parametrize("mode", ["split", "direct"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cross(dtype, mode):
    tb = triton_or_skip()
    xs = small_layers(dtype)
    ys = partners(xs, dtype)
    with tb.tuning(**(TRITON_SPLIT if mode == "split" else TRITON_DIRECT)):
        got = tb.cross(xs, ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X, Y = sh(x), sh(y)
        for j, (want, scale) in enumerate(products(X, Y)):
            assert got[j][i].dtype == torch.float32 and got[j][i].shape == want.shape
            close(got[j][i], want, scale, dtype, k=X.shape[0], msg=f"layer {i} product {j}")
        assert torch.equal(got[0][i], got[0][i].T) and torch.equal(got[1][i], got[1][i].T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cross_backward(dtype):
    tb = triton_or_skip()
    xs = small_layers(dtype)
    ys = partners(xs, dtype)
    g = torch.Generator().manual_seed(4)
    ms = [torch.randn(x.shape[1], x.shape[1], generator=g).to(device()) for x in xs]
    ns = [torch.randn(y.shape[1], x.shape[1], generator=g).to(device()) for x, y in zip(xs, ys)]
    vs = [torch.randn(x.shape[1], generator=g).to(device()) for x in xs]
    ns[0] = torch.randn(xs[0].shape[1], ys[0].shape[1], generator=g).to(device()).T  # strided n
    with tb.tuning(**TRITON_SMALL):
        got = tb.cross_backward(xs, ms, ys, ns, vs)
    for d, x, m, y, n_, v in zip(got, xs, ms, ys, ns, vs):
        assert d.dtype == x.dtype and d.shape == x.shape
        want = sh(x) @ fp64(m) + sh(y) @ fp64(n_) + fp64(v)
        scale = abs_product(sh(x), m) + abs_product(sh(y), n_) + fp64(v).abs()
        close(d, want, scale, dtype, k=x.shape[1] + y.shape[1] + 1, c=4)


# --------------------------------------------------------------------------- cuda, GPU
@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_cross(dtype):
    g = torch.Generator(device="cuda").manual_seed(4)
    xs = [x for x in awkward_layers(dtype, torch.Generator(device="cuda").manual_seed(3), "cuda") if x.shape[1] < 5000]
    xs.append(torch.randn(5000, 70, device="cuda", generator=g).to(dtype))  # long n: split-K
    qs = [3, 64, 65, 1, 130, 0, 33, 9, 200, 31, 7, 5, 70, 33]
    assert len(qs) == len(xs)
    ys = [_gpu_partner(x, q, dtype, g) for x, q in zip(xs, qs)]
    ys[-2] = ys[-2] - 7.0  # the offset layer's partner gets an offset of its own
    outs = cb.cross(xs, ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X, Y = shifted(x), shifted(y)
        want = (X.T @ X, Y.T @ Y, X.T @ Y, X.sum(0), Y.sum(0))
        for k in range(5):
            o = outs[k][i]
            assert o.dtype == torch.float32 and o.shape == want[k].shape
            if want[k].numel() and want[k].norm() > 0:
                assert rel(o, want[k]) <= cuda_prod_tol(x.shape[0], dtype), (i, k, x.shape, y.shape)
            else:
                assert torch.all(o == 0), (i, k)


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_cross_backward(dtype):
    g = torch.Generator(device="cuda").manual_seed(5)
    xs = [x for x in awkward_layers(dtype, torch.Generator(device="cuda").manual_seed(6), "cuda") if x.shape[1] < 5000]
    qs = [3, 64, 65, 1, 130, 0, 33, 9, 200, 31, 7, 5, 70]
    assert len(qs) == len(xs)
    ys = [_gpu_partner(x, q, dtype, g) for x, q in zip(xs, qs)]
    f = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    ms = [f(x.shape[1], x.shape[1]) for x in xs]
    ns = [f(y.shape[1], x.shape[1]) for x, y in zip(xs, ys)]
    vs = [f(x.shape[1]) for x in xs]
    for d, x, m, y, n, v in zip(cb.cross_backward(xs, ms, ys, ns, vs), xs, ms, ys, ns, vs):
        assert d.dtype == dtype and d.shape == x.shape
        if d.numel():
            want = shifted(x) @ fp64(m) + shifted(y) @ fp64(n) + fp64(v)
            assert rel(d, want) <= cuda_prod_tol(x.shape[1] + y.shape[1] + 1, dtype), (x.shape, y.shape)


def _gpu_partner(x, q, dtype, g):
    return torch.randn(x.shape[0], q, device="cuda", generator=g).to(dtype)
