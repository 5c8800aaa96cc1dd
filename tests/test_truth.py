"""The package's fp64 truth (``guidance_kernels/truth.py``, used by the bench and the peer
comparison) against the tests' independent textbook formulas (``reference_math.py``), and the
PyPI peer adapters (``peer_adapters.py``) against it."""

from __future__ import annotations

import pytest
import torch

import reference_math as R
from guidance_kernels import truth
from guidance_kernels.peer_adapters import PEERS
from tolerance import bound, score_bound


def _correlated(n, p, q, seed, shape_x=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x = z @ torch.randn(4, p, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, p, generator=g, dtype=torch.float64)
    y = z @ torch.randn(4, q, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return (x.reshape(n, *shape_x) if shape_x else x), y


# sample form (n small vs p + q) and feature form (n large): both branches of the cost model
@pytest.mark.parametrize("n,p,q", [(8, 40, 30), (200, 6, 5), (33, 12, 12)])
def test_cka_and_debiased_match_textbook(n, p, q):
    x, y = _correlated(n, p, q, seed=n)
    tol = score_bound("cka", torch.float64, n, max(p, q))
    # debiased: Song's formula sums uncentred Gram entries (cancellation): a wider, still tiny bound
    assert abs(float(truth.cka(x, y)) - float(R.cka(x, y))) <= tol
    assert abs(float(truth.debiased_cka(x, y)) - float(R.debiased_cka(x, y))) <= 100 * tol


def test_hsic_unbiased_batched_equals_per_slice():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, 9, 7, generator=g, dtype=torch.float64)
    k, l_ = a @ a.mT, b @ b.mT
    got = truth.hsic_unbiased(k, l_)
    assert got.shape == (3,)
    for i in range(3):
        want = R.hsic_unbiased(k[i], l_[i])
        # n² = 81 fp64 terms, each up to max|K| max|L|
        assert abs(float(got[i] - want)) <= bound(torch.float64, 81) * float(k[i].abs().max() * l_[i].abs().max()) * 81


def test_loss_and_grad_match_autograd_of_textbook():
    xs, ys = zip(*[_correlated(16, 6, 4, seed=s, shape_x=(2, 3)) for s in (3, 4)])
    loss, grads = truth.loss_and_grad(list(xs), list(ys), "cka", grad=True)
    want = 0.0
    for x, y, g in zip(xs, ys, grads):
        x = x.clone().requires_grad_(True)
        v = 1.0 - R.cka(x, y)
        want += float(v.detach())
        (gw,) = torch.autograd.grad(v, x)
        assert g.shape == x.shape
        assert float((g - gw).norm() / gw.norm()) <= bound(torch.float64, 16 * 6) * 100
    assert abs(loss - want) <= 2 * score_bound("cka", torch.float64, 16, 6)
    loss_d, none = truth.loss_and_grad(list(xs), list(ys), "debiased_cka")
    assert none is None
    assert abs(loss_d - sum(1 - float(R.debiased_cka(x, y)) for x, y in zip(xs, ys))) <= 1e3 * bound(torch.float64, 16)


def test_minibatch_cka_one_batch_is_debiased_cka_and_drops_short_batch():
    a = [_correlated(24, 7, 5, seed=5)[0], _correlated(24, 3, 5, seed=6)[0]]
    b = [_correlated(24, 4, 9, seed=7)[1]]
    m = truth.minibatch_cka(a, b, 24)
    assert m.shape == (2, 1) and m.dtype == torch.float64
    for i in range(2):
        assert abs(float(m[i, 0] - R.debiased_cka(a[i], b[0]))) <= 1e3 * bound(torch.float64, 24)
    # 24 = 2 batches of 10 + a dropped 4: the same as the first 20 samples
    assert torch.equal(truth.minibatch_cka(a, b, 10), truth.minibatch_cka([t[:20] for t in a], [t[:20] for t in b], 10))


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_adapter_matches_truth(name):
    peer = PEERS[name]
    why = peer.why_unavailable()
    if why is not None:
        pytest.skip(f"{name}: {why}")
    xs, ys = zip(*[_correlated(32, 10, 6, seed=s) for s in (8, 9)])
    xs, ys = [x.float() for x in xs], [y.float() for y in ys]
    want, _ = truth.loss_and_grad(xs, ys, peer.metric)
    assert abs(float(peer.pair_loss(xs, ys)) - want) <= 2 * score_bound(peer.metric, torch.float32, 32, 10)
    m = peer.minibatch_map(xs, ys, 16)
    assert m.shape == (2, 2)
    ref = truth.minibatch_cka(xs, ys, 16)
    assert float((m.double() - ref).abs().max()) <= 2 * score_bound("debiased_cka", torch.float32, 16, 10)


def test_peer_adapter_says_why_when_absent():
    class Missing(type(PEERS["ckatorch"])):
        dist, module = "no-such-peer", "no_such_peer_module_xyz"

    assert "not installed (pip install no-such-peer)" == Missing().why_unavailable()
