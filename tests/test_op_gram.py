"""``guidance_kernels::gram`` / ``gram_backward``: ``K = x' x'ᵀ`` of the row-shifted activation
and ``dx = m x'`` (``docs/design.md``). Math: ``backends/reference.py``; kernels:
``kernels/triton_forward.py``, ``kernels/triton_backward.py``, ``csrc/gram_fwd.cu``,
``csrc/gram_bwd.cu``; autograd: ``ops/products.py``.

First the contract on every backend available here (reference; triton under the interpreter on
CPU; cuda with a GPU), then each kernel backend's own checks: Triton with tiny tiles (several
tiles per layer, split-K and direct stores), CUDA on the awkward layers on a GPU."""

from __future__ import annotations

import pytest
import torch

from guidance_kernels.backends import cuda as cb
from guidance_kernels.backends import get_backend
from guidance_kernels.planning import acc_dtype
from helpers import (
    DTYPES, TRITON_DIRECT, TRITON_SMALL, TRITON_SPLIT, awkward_layers, backend_params, close, cuda_prod_tol,
    cuda_ready, device, fp64, rel, sh, shifted, small_layers, triton_or_skip,
)
from tolerance import abs_product, frob_bound

cuda_ready = cuda_ready()


# --------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_gram_and_backward_every_backend(backend, dtype):
    """The backend's products vs fp64 products of the same (rounded) inputs, row-shifted."""
    b = get_backend(backend)
    xs = small_layers(dtype)
    for k, x in zip(b.gram(xs), xs):
        assert k.dtype == acc_dtype(dtype) and k.shape == (x.shape[0], x.shape[0])
        assert rel(k, sh(x) @ sh(x).T) <= frob_bound(dtype, x.shape[1])
    g = torch.Generator().manual_seed(2)
    ms = [torch.randn(x.shape[0], x.shape[0], generator=g).to(device(), acc_dtype(dtype)) for x in xs]
    for d, m, x in zip(b.gram_backward(ms, xs), ms, xs):
        assert d.dtype == dtype and d.shape == x.shape
        assert rel(d, fp64(m) @ sh(x)) <= frob_bound(dtype, x.shape[0])


# --------------------------------------------------------------------------- triton, tiny tiles
@pytest.mark.parametrize("mode", ["split", "direct"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gram(dtype, mode):
    tb = triton_or_skip()
    xs = small_layers(dtype)
    with tb.tuning(**(TRITON_SPLIT if mode == "split" else TRITON_DIRECT)):
        got = tb.gram(xs)
    for k, x in zip(got, xs):
        assert k.dtype == torch.float32 and k.shape == (x.shape[0], x.shape[0])
        X = sh(x)
        close(k, X @ X.T, abs_product(X, X.T), dtype, k=X.shape[1])
        assert torch.equal(k, k.T)  # diagonal tiles symmetrized, off-diagonal mirrored


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gram_backward(dtype):
    tb = triton_or_skip()
    xs = small_layers(dtype)
    g = torch.Generator().manual_seed(2)
    ms = [torch.randn(x.shape[0], x.shape[0], generator=g).to(device()) for x in xs]
    ms[1] = ms[1].T  # non-contiguous m (not symmetric: checks m x, not mᵀ x)
    with tb.tuning(**TRITON_SMALL):
        got = tb.gram_backward(ms, xs)
    for d, m, x in zip(got, ms, xs):
        assert d.dtype == x.dtype and d.shape == x.shape
        # m rounded to the dot's dtype, x' shifted in it, the output rounded to it: c = 4
        close(d, fp64(m) @ sh(x), abs_product(m, sh(x)), dtype, k=x.shape[0], c=4)


def test_triton_gram_backward_fp16_tiny_gradients():
    """CKA gradients are ~1/(n² p): unscaled, such an m is subnormal in fp16 and loses most
    digits; the kernel scales each output column before the fp16 dot."""
    tb = triton_or_skip()
    g = torch.Generator().manual_seed(3)
    x = (30 * torch.randn(33, 70, generator=g)).half().to(device())
    m = 1e-6 * torch.randn(33, 33, generator=g).to(device())
    with tb.tuning(**TRITON_SMALL):
        (d,) = tb.gram_backward([m], [x])
    close(d, fp64(m) @ sh(x), abs_product(m, sh(x)), torch.float16, k=x.shape[0], c=4)


# --------------------------------------------------------------------------- cuda, GPU
@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_gram(dtype):
    xs = awkward_layers(dtype, torch.Generator(device="cuda").manual_seed(0), "cuda")
    got = cb.gram(xs)
    for k, x in zip(got, xs):
        assert k.dtype == torch.float32 and k.shape == (x.shape[0], x.shape[0])
        want = shifted(x) @ shifted(x).T
        if want.numel() and want.norm() > 0:
            assert rel(k, want) <= cuda_prod_tol(x.shape[1], x.dtype), x.shape
        else:
            # p == 0 or n == 1 (x' = 0): exact zeros, not NaN (outputs are NaN-poisoned)
            assert torch.all(k == 0)
    # mirrored off-diagonal tiles and the diagonal tiles: symmetric to rounding
    for k in got:
        if k.numel() and k.norm() > 0:
            assert rel(k, k.T) <= frob_bound(torch.float32, 1)  # mirrored: equal up to a rounding


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_gram_backward(dtype):
    xs = awkward_layers(dtype, torch.Generator(device="cuda").manual_seed(1), "cuda")
    g = torch.Generator(device="cuda").manual_seed(2)
    ms = [torch.randn(x.shape[0], x.shape[0], device="cuda", generator=g) for x in xs]
    for d, m, x in zip(cb.gram_backward(ms, xs), ms, xs):
        assert d.dtype == dtype and d.shape == x.shape and d.is_contiguous()
        if d.numel():
            want = fp64(m) @ shifted(x)
            if want.norm() > 0:
                assert rel(d, want) <= cuda_prod_tol(x.shape[0], dtype), x.shape
            else:
                assert torch.all(d == 0), x.shape  # n == 1: x' = 0
