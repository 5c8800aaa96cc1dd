"""Procrustes (``docs/design.md``): not an op of its own but ``metrics.procrustes_from_grams`` on
two ``gram`` outputs (fp64 Grams), with the nuclear norm's backward in ``metrics._NuclearNorm``;
its kernels are gram's. Value and gradient on every backend available here against the
independent fp64 formula of ``reference_math.py`` (SVD of ``Xnᵀ Yn``). gradcheck / the
rank-deficient gradient: ``test_gradcheck.py``; degenerate input: ``test_degenerate.py``."""

from __future__ import annotations

import pytest
import torch

import guidance_kernels as gk
import reference_math as R
from helpers import backend_params, device, rel
from tolerance import bound, score_bound


@pytest.mark.parametrize("angular", [False, True], ids=["squared", "angular"])
@pytest.mark.parametrize("backend", backend_params())
def test_procrustes_every_backend(backend, angular):
    # n > p + q: Xcᵀ Yc (p x q) has full rank, so the SVD gradient of the formula is defined
    n, p, q = 40, 6, 5
    g = torch.Generator().manual_seed(21)
    z = torch.randn(n, 3, generator=g)
    x = (z @ torch.randn(3, p, generator=g) + 0.5 * torch.randn(n, p, generator=g) + 2.0).to(device())
    y = (z @ torch.randn(3, q, generator=g) + 0.5 * torch.randn(n, q, generator=g) - 1.0).to(device())
    xg = x.clone().requires_grad_()
    got = gk.procrustes(xg, y, angular=angular, backend=backend)
    (gx,) = torch.autograd.grad(got, xg)
    x64 = x.double().requires_grad_()
    want = R.procrustes(x64, y.double(), angular=angular)
    (wx,) = torch.autograd.grad(want, x64)
    assert abs(float(got.detach()) - float(want.detach())) <= score_bound("procrustes", torch.float32, n, p)
    # fp32 inputs, fp64 Grams: n p-term products, then n² Gram terms in the eigensolver
    assert rel(gx, wx) <= bound(torch.float32, p + n * n, c=32)
