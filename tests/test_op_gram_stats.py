"""``guidance_kernels::gram_stats``: ``(Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)`` fp64 of stacked
centered Grams (``docs/design.md``). Math: ``metrics.gram_stats``; kernel:
``kernels/triton_stats.py``; autograd: ``ops/stats.py`` (its opcheck and gradient through the
op: ``test_ops.py::test_gram_stats_op``)."""

from __future__ import annotations

import pytest
import torch

from guidance_kernels import ops
from helpers import backend_params, close, device, triton_or_skip


def _naive_stats(k, l):
    k, l = k.double(), l.double()
    return torch.stack([(k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2)),
                        k.diagonal(dim1=1, dim2=2).sum(1), l.diagonal(dim1=1, dim2=2).sum(1)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_gram_stats_every_backend(backend, dtype):
    """Through the op on every backend: fp64 sums of n² exact products in some order, within
    n² eps64 of the sum of |terms|."""
    n = 9
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, 7, generator=g)
    k = (x @ x.mT).to(device(), dtype)
    l = torch.randn(4, n, n, generator=g).to(device(), dtype)
    got = ops.gram_stats(k, l, backend)
    assert got.dtype == torch.float64 and got.shape == (4, 5)
    close(got, _naive_stats(k, l), _naive_stats(k.abs(), l.abs()), torch.float64, k=n * n)


@pytest.mark.parametrize("n", [1, 5, 33])
def test_triton_gram_stats_matches_reference(n):
    """One stats launch for every pair: (Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L) in fp64, here with
    several chunks per pair (n = 33: 1089 elements over 4 programs of 256)."""
    tb = triton_or_skip()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 2 * n + 1, generator=g)
    k = (x @ x.mT).to(device())
    l = (torch.randn(3, n, n, generator=g) * 1e18).to(device())  # fp32 products would overflow
    got = tb.gram_stats(k, l)
    assert got.dtype == torch.float64 and got.shape == (3, 5)
    # fp64 sums of n² exact products in another order: within n² eps64 of the sum of |terms|
    close(got, _ref_gram_stats(k, l), _ref_gram_stats(k.abs(), l.abs()), torch.float64, k=n * n)
    torch.library.opcheck(ops.gram_stats, (k.requires_grad_(), l, "triton"))


def _ref_gram_stats(k, l):
    from guidance_kernels import metrics

    return metrics.gram_stats(k, l)
