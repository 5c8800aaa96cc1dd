"""The Triton backend on activations with a large common offset (``randn ± 1e3``; deep layers of
a default-initialised MLP, ``||Kc|| / ||K|| ~ 1e-6``): the row shift (``docs/design.md``) keeps
every product, and fp32 CKA with its gradient, as accurate as for zero-mean data. Runs under
``TRITON_INTERPRET=1`` on CPU."""

from __future__ import annotations

import pytest
import torch

import guidance_kernels as gk
from helpers import TRITON_DIRECT as DIRECT
from helpers import TRITON_SPLIT as SPLIT
from helpers import close, device, fp64, products, sh, triton_or_skip
from tolerance import abs_product, bound, rel

DEV = device()


@pytest.fixture
def tb():
    return triton_or_skip()


def _cka64(x, y):
    """Linear CKA in fp64 from explicitly centered features (independent of the package)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    x, y = x - x.mean(0), y - y.mean(0)
    return (x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def _mlp_activations(n, width, depth, seed):
    """fp64 activations of a ReLU MLP with PyTorch's default ``nn.Linear`` initialisation
    (weights and biases ~ U(±1/sqrt(fan_in))): deep layers share a large common offset."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, width, generator=g, dtype=torch.float64)
    b = width**-0.5
    out = []
    for _ in range(depth):
        w = (2 * torch.rand(width, width, generator=g, dtype=torch.float64) - 1) * b
        c = (2 * torch.rand(width, generator=g, dtype=torch.float64) - 1) * b
        h = torch.relu(h @ w.T + c)
        out.append(h)
    return out


def test_large_common_offset_primitives(tb):
    """fp32 inputs around ±1e3: the shift is exact on load, so every product is as accurate as
    for zero-mean data (unshifted fp32 products would lose all the centered information)."""
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(37, 45, generator=g) + 1e3).to(DEV)
    y = (0.1 * torch.randn(37, 21, generator=g) - 1e3).to(DEV)
    m = torch.randn(37, 37, generator=g).to(DEV)
    mm, nn_ = torch.randn(45, 45, generator=g).to(DEV), torch.randn(21, 45, generator=g).to(DEV)
    v = torch.randn(45, generator=g).to(DEV)
    X, Y = sh(x), sh(y)
    for mode in (SPLIT, DIRECT):
        with tb.tuning(**mode):
            (k,) = tb.gram([x])
            got = [r[0] for r in tb.cross([x], [y])]
            (d,) = tb.gram_backward([m], [x])
            (e,) = tb.cross_backward([x], [mm], [y], [nn_], [v])
        # bounds in terms of the *shifted* operands: an unshifted kernel is off by ~1e3 x these
        f32 = torch.float32
        close(k, X @ X.T, abs_product(X, X.T), f32, k=X.shape[1])
        for j, (want, scale) in enumerate(products(X, Y)):
            close(got[j], want, scale, f32, k=X.shape[0], msg=f"product {j}")
        close(d, fp64(m) @ X, abs_product(m, X), f32, k=X.shape[0])
        scale = abs_product(X, mm) + abs_product(Y, nn_) + fp64(v).abs()
        close(e, X @ fp64(mm) + Y @ fp64(nn_) + fp64(v), scale, f32, k=X.shape[1] + Y.shape[1] + 1)


def _offset_case(case):
    g = torch.Generator().manual_seed(14)
    if case.startswith("deep_mlp"):
        acts = _mlp_activations(48 if case.endswith("sample") else 256, 64, 10, 0)
        x, y = acts[0], acts[-1]
        k = y @ y.T
        h = torch.eye(k.shape[0], dtype=k.dtype) - 1.0 / k.shape[0]
        assert (h @ k @ h).norm() / k.norm() < 1e-5  # the regime this test is about
    elif case == "offset_sample":  # n (p + q) < p² + pq + q²: sample form
        x = torch.randn(40, 300, generator=g, dtype=torch.float64)
        y = x[:, :200] + 0.7 * torch.randn(40, 200, generator=g, dtype=torch.float64)
        x, y = x + 1e3, y - 1e3
    else:  # feature form
        x = torch.randn(300, 20, generator=g, dtype=torch.float64)
        y = x[:, :12] + 0.7 * torch.randn(300, 12, generator=g, dtype=torch.float64)
        x, y = x + 1e3, y - 1e3
    return x.float().to(DEV), y.float().to(DEV)


@pytest.mark.parametrize("case", ["offset_sample", "offset_feature", "deep_mlp_sample", "deep_mlp_feature"])
def test_cka_large_common_offset(tb, case):
    """fp32 CKA (value and gradient) of activations with a large common offset matches fp64 CKA
    of the same fp32 values: x = randn ± 1e3, and the layers 1 and 10 of a default-initialised
    deep MLP (||Kc|| / ||K|| ~ 1e-6). Centering unshifted fp32 products gives garbage here."""
    x, y = _offset_case(case)
    assert gk.choose_form(x.shape[0], x.shape[1], y.shape[1]) == ("sample" if case.endswith("sample") else "feature")
    xg = x.clone().requires_grad_()
    got = gk.cka(xg, y, backend="triton")
    (gx,) = torch.autograd.grad(got, xg)
    x64 = fp64(x).requires_grad_()
    want = _cka64(x64, fp64(y))
    (wx,) = torch.autograd.grad(want, x64)
    assert 0.05 < want.item() < 0.99
    k = max(x.shape)  # longest fp32 sum: p features (sample form) or n samples (feature form)
    assert abs(got.item() - want.item()) <= bound(torch.float32, k, c=1), (got.item(), want.item())
    assert rel(gx, wx) <= bound(torch.float32, k, c=4)
