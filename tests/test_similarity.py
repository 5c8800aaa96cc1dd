"""Minibatch CKA maps (guidance_kernels.similarity): estimator, invariances, edge cases.

The reference implementations here are written independently of the package: Song et al.'s
unbiased HSIC straight from its formula (ones vectors, zeroed diagonals), in fp64."""

import pytest
import torch
from torch import nn

import guidance_kernels as gk
from guidance_kernels.similarity import MinibatchCKA, minibatch_cka
from guidance_kernels.similarity.capture import layer_cka, resolve_layers
from tolerance import eps, score_bound

F32, F64 = torch.float32, torch.float64


def tol_for(dtype, n, p=40, c=4.0):
    """Bound for debiased CKA maps of batches of ``n`` with up to ``p`` features whose Grams
    accumulate in ``dtype``'s accumulation dtype (fp32 for bf16: the truth uses the same values)."""
    return score_bound("debiased_cka", F64 if dtype == F64 else F32, n, p, c)


# ----------------------------------------------------------------------------- fp64 references
def hsic_song(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of linear kernels, fp64, from the formula."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    n = x.shape[0]
    K, L = x @ x.T, y @ y.T
    K = K * (1 - torch.eye(n, dtype=K.dtype))
    L = L * (1 - torch.eye(n, dtype=L.dtype))
    one = torch.ones(n, 1, dtype=torch.float64)
    t1 = torch.trace(K @ L)
    t2 = (one.T @ K @ one) * (one.T @ L @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one.T @ K @ L @ one)
    return ((t1 + t2 - t3) / (n * (n - 3))).squeeze()


def ref_minibatch(A, B, bounds):
    """NRK minibatch CKA over explicit batch (start, end) bounds, fp64."""
    out = torch.zeros(len(A), len(B), dtype=torch.float64)
    for i, a in enumerate(A):
        for j, b in enumerate(B):
            xy = sum(hsic_song(a[s:e], b[s:e]) for s, e in bounds)
            xx = sum(hsic_song(a[s:e], a[s:e]) for s, e in bounds)
            yy = sum(hsic_song(b[s:e], b[s:e]) for s, e in bounds)
            out[i, j] = xy / torch.sqrt(xx * yy)
    return out


def layers(N=96, seed=0, dtype=torch.float32):
    """Related layers (a shared latent), with offsets and ReLUs, plus one unrelated layer."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 6, generator=g, dtype=torch.float64)
    A = [torch.relu(z @ torch.randn(6, 40, generator=g, dtype=torch.float64)) + 1.5,
         z @ torch.randn(6, 12, generator=g, dtype=torch.float64),
         (z[:, :2] @ torch.randn(2, 3, 5, generator=g, dtype=torch.float64).flatten(1)).reshape(N, 3, 5)]
    B = [torch.tanh(z @ torch.randn(6, 20, generator=g, dtype=torch.float64)),
         torch.randn(N, 9, generator=g, dtype=torch.float64),
         z[:, 3:] @ torch.randn(3, 30, generator=g, dtype=torch.float64) + 0.3 * torch.randn(N, 30, generator=g, dtype=torch.float64)]
    return [a.to(dtype) for a in A], [b.to(dtype) for b in B]


def batches(A, B, bounds):
    return [([a[s:e] for a in A], [b[s:e] for b in B]) for s, e in bounds]


def bounds_of(N, bs):
    return [(s, min(s + bs, N)) for s in range(0, N, bs)]


# ----------------------------------------------------------------------------- estimator
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_batch_equals_full_dataset_unbiased_fp64(dtype):
    tol = tol_for(dtype, 80)
    A, B = layers(80, dtype=dtype)
    got = minibatch_cka([(A, B)])
    A64, B64 = [a.double() for a in A], [b.double() for b in B]
    want = torch.tensor([[float(hsic_song(a, b) / torch.sqrt(hsic_song(a, a) * hsic_song(b, b)))
                          for b in B64] for a in A64], dtype=torch.float64)
    assert (got - want).abs().max() < tol
    # and the package's one-batch debiased CKA agrees (a different code path: cka_matrix)
    assert (got - gk.cka_matrix(A64, B64, debiased=True)).abs().max() <= tol + tol_for(F64, 80)


@pytest.mark.parametrize("bs", [8, 16, 25, 96])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_independent_fp64_minibatch(bs, dtype):
    A, B = layers(96, seed=1, dtype=dtype)
    bounds = bounds_of(96, bs)  # bs=25: a ragged last batch of 21, included with its own n
    got = minibatch_cka(batches(A, B, bounds))
    want = ref_minibatch(A, B, bounds)  # on the same (bf16-rounded) values, in fp64
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    # bf16 activations accumulate in fp32 and the truth uses the same values: fp32's bound
    assert (got - want).abs().max() <= tol_for(dtype, bs)


def test_batch_order_and_within_batch_permutation_invariance():
    A, B = layers(120, seed=2)
    bounds = bounds_of(120, 24)
    base = minibatch_cka(batches(A, B, bounds))
    rev = minibatch_cka(batches(A, B, bounds[::-1]))
    assert (base - rev).abs().max() <= tol_for(F64, 24)  # the same Grams, fp64 sums in another order
    # permute samples inside every batch (same partition): unbiased HSIC is permutation invariant
    g = torch.Generator().manual_seed(0)
    perm = torch.cat([s + torch.randperm(e - s, generator=g) for s, e in bounds])
    shuf = minibatch_cka(batches([a[perm] for a in A], [b[perm] for b in B], bounds))
    assert (base - shuf).abs().max() <= tol_for(F32, 24)  # fp32 Gram rounding in a different order


def test_batch_size_invariance_in_expectation():
    """The unbiased minibatch estimate does not drift with the batch size (it differs from the
    full-dataset value only by sampling noise); the average of biased per-batch CKA does."""
    N = 1536
    g = torch.Generator().manual_seed(3)
    z = torch.randn(N, 4, generator=g)
    A = [z @ torch.randn(4, 64, generator=g) + 2.0 * torch.randn(N, 64, generator=g)]
    B = [z[:, :2] @ torch.randn(2, 64, generator=g) + 2.0 * torch.randn(N, 64, generator=g)]
    full = minibatch_cka([(A, B)])
    for bs in (16, 32, 128):
        unb = minibatch_cka(batches(A, B, bounds_of(N, bs)))
        biased = torch.stack([gk.cka_matrix([a[s:e] for a in A], [b[s:e] for b in B])
                              for s, e in bounds_of(N, bs)]).mean(0)
        assert (unb - full).abs().max() < 0.03, (bs, unb, full)
        assert (biased - full).abs().max() > 3 * (unb - full).abs().max(), (bs, biased, unb, full)


# ----------------------------------------------------------------------------- structure
def test_self_map_symmetric_and_exact_ones_on_diagonal():
    A, B = layers(100, seed=4)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        xs = [t.to(dt) for t in A + B]
        m = minibatch_cka([[x[s:e] for x in xs] for s, e in bounds_of(100, 30)], symmetric=True)
        assert torch.equal(m, m.T)
        assert torch.equal(m.diagonal(), torch.ones(6, dtype=torch.float64))
        assert torch.isfinite(m).all()


def test_cross_map_is_block_of_self_map():
    A, B = layers(64, seed=5)
    bounds = bounds_of(64, 16)
    cross = minibatch_cka(batches(A, B, bounds))
    full = minibatch_cka([[x[s:e] for x in A + B] for s, e in bounds], symmetric=True)
    assert (full[:3, 3:] - cross).abs().max() <= tol_for(F64, 16)  # the same fp32 Grams, fp64 sums


def test_degenerate_layer_is_zero_and_finite():
    A, B = layers(64, seed=6)
    A = A + [torch.full((64, 7), 3.0), torch.zeros(64, 5)]
    m = minibatch_cka(batches(A, B, bounds_of(64, 16)))
    assert torch.isfinite(m).all()
    assert torch.equal(m[3:], torch.zeros(2, 3, dtype=torch.float64))
    s = minibatch_cka([[x[i:i + 16] for x in A] for i in range(0, 64, 16)], symmetric=True)
    assert torch.equal(s.diagonal()[3:], torch.zeros(2, dtype=torch.float64))  # documented: 0
    assert torch.equal(s.diagonal()[:3], torch.ones(3, dtype=torch.float64))


def test_mixed_dtypes_and_feature_shapes():
    A, B = layers(48, seed=7)
    A = [A[0].double(), A[1].bfloat16(), A[2]]
    m = minibatch_cka(batches(A, B, bounds_of(48, 12)))
    want = ref_minibatch(A, B, bounds_of(48, 12))
    assert (m - want).abs().max() <= tol_for(F32, 12)


def test_small_batch_is_a_clear_error():
    acc = MinibatchCKA(1, 1)
    with pytest.raises(ValueError, match=r"n >= 4.*(drop|Drop)"):
        acc.update([torch.randn(3, 5)], [torch.randn(3, 4)])
    with pytest.raises(RuntimeError, match="update"):
        acc.compute()
    with pytest.raises(ValueError, match="ys is required"):
        acc.update([torch.randn(8, 5)])
    with pytest.raises(ValueError, match="n = 8 samples but ys have n = 9"):
        acc.update([torch.randn(8, 5)], [torch.randn(9, 4)])


def test_no_host_sync_no_grad_and_bounded_state(monkeypatch):
    A, B = layers(64, seed=8)
    A = [a.clone().requires_grad_(True) for a in A]
    acc = MinibatchCKA(3, 3)

    def boom(*a, **k):
        raise AssertionError(".item() called")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    for _ in range(3):  # the same data three times: state does not grow with the number of batches
        for xs, ys in batches(A, B, bounds_of(64, 16)):
            acc.update(xs, ys)
    m = acc.compute()
    assert not m.requires_grad
    assert acc.batches == 12 and acc.samples == 192
    assert acc.hsic.shape == (3, 3) and acc.self_a.shape == (3,) and acc.self_b.shape == (3,)
    monkeypatch.undo()
    once = minibatch_cka(batches([a.detach() for a in A], B, bounds_of(64, 16)))
    assert (m - once).abs().max() <= 3 * tol_for(F64, 16)  # three identical epochs = one epoch


# ----------------------------------------------------------------------------- over models
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 64, 16)
        self.fc2 = nn.Linear(16, 10)
        self.drop = nn.Dropout(0.5)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8)))
        return self.fc2(self.drop(torch.relu(self.fc1(h.flatten(1)))))


def test_layer_cka_over_models_matches_manual_activations():
    torch.manual_seed(0)
    ma, mb = Tiny(), nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(70, 1, 8, 8)
    ma.train()
    mb.eval()
    res = layer_cka(ma, mb, x, batch_size=16)  # 4 batches of 16 + a last batch of 6 (kept: >= 4)
    assert ma.training and not mb.training  # flags restored
    assert res.layers_a == ["conv", "fc1", "fc2"] and res.layers_b == ["1", "3"]
    assert res.batches == 5 and res.samples == 70 and res.dropped == 0
    ma.eval()
    with torch.no_grad():
        h = torch.relu(ma.conv(x))
        a1 = ma.fc1(h.flatten(1))
        A = [ma.conv(x), a1, ma.fc2(torch.relu(a1))]
        B = [mb[1](x.flatten(1)), mb(x)]
    want = ref_minibatch(A, B, bounds_of(70, 16))
    assert (res.matrix - want).abs().max() <= tol_for(F32, 16, p=4 * 64)
    # ragged handling: drop the last batch of 6
    res2 = layer_cka(ma, mb, x, batch_size=16, ragged="drop")
    assert res2.batches == 4 and res2.dropped == 6
    want2 = ref_minibatch(A, B, bounds_of(64, 16))
    assert (res2.matrix - want2).abs().max() <= tol_for(F32, 16, p=4 * 64)
    with pytest.raises(ValueError, match="last batch has 2"):
        layer_cka(ma, mb, x[:66], batch_size=16, ragged="include")
    assert layer_cka(ma, mb, x[:66], batch_size=16).dropped == 2  # auto: < 4 dropped


def test_layer_cka_self_and_selection():
    m = Tiny()
    x = torch.randn(40, 64)
    r = layer_cka(m, None, x, layers_a="fc*,Conv2d", batch_size=20)
    assert r.symmetric and r.layers_a == ["conv", "fc1", "fc2"]
    assert torch.equal(r.matrix, r.matrix.T) and torch.equal(r.matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    r2 = layer_cka(m, m, x, layers_a="fc1", layers_b="auto", batch_size=20)  # same model, other rows
    assert not r2.symmetric and r2.matrix.shape == (1, 3)
    assert (r2.matrix[0] - r.matrix[1]).abs().max() <= tol_for(F64, 20, p=4 * 64)  # same Grams
    with pytest.raises(KeyError, match="matches no module"):
        resolve_layers(m, "fc9")
    assert resolve_layers(m, "Dropout,fc2") == ["fc2", "drop"]  # class names; registration order
    with pytest.raises(KeyError, match="'ReLU' matches no"):  # every entry must match something
        resolve_layers(m, "ReLU,Dropout")


def test_amp_bf16_forward():
    m = Tiny()
    x = torch.randn(64, 64)
    r32 = layer_cka(m, None, x, batch_size=32)
    rbf = layer_cka(m, None, x, batch_size=32, amp=True)
    assert torch.isfinite(rbf.matrix).all() and torch.equal(rbf.matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    # activations rounded to bf16 at each of 3 layers: a few bf16 eps of CKA
    assert (rbf.matrix - r32.matrix).abs().max() <= 8 * eps(torch.bfloat16)


def test_peer_pytorch_cka_agrees_where_installed():
    pytest.importorskip("cka")
    from guidance_kernels.similarity import peers

    A, B = layers(128, seed=9)
    ours = peers.run_ours(A, B, 32)
    theirs = peers.run_pytorch_cka(A, B, 32)
    truth = peers.fp64_minibatch_cka(A, B, 32)
    pos = truth > 0  # pytorch-cka clamps negative unbiased estimates to 0
    assert (ours - truth).abs().max() <= tol_for(F32, 32)
    # pytorch-cka centres raw fp32 Grams: cancellation against the layers' offsets costs it more
    assert (theirs - ours)[pos].abs().max() <= tol_for(F32, 32, c=64)
    assert (theirs[~pos] == 0).all()
