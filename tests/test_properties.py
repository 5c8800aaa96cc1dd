"""Mathematical properties of the metrics (reference backend, fp64 unless stated)."""

import pytest
import torch

import guidance_kernels as gk
from tolerance import bound, score_bound

F32, F64 = torch.float32, torch.float64


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_cka_of_a_representation_with_itself_is_one():
    x = _rand(20, 3, 4)
    assert abs(float(gk.cka(x, x)) - 1) <= score_bound("cka", F64, 20, 12)
    assert abs(float(gk.cka(x, x, debiased=True)) - 1) <= score_bound("debiased_cka", F64, 20, 12)
    assert abs(float(gk.procrustes(x, x))) <= score_bound("procrustes", F64, 20, 12)
    # one fp32 Gram on both sides: its statistics are fp64 sums of exact products
    assert abs(float(gk.cka(x.float(), x.float())) - 1) <= bound(F32)


@pytest.mark.parametrize("metric", gk.METRICS)
def test_symmetry(metric):
    x, y = _rand(15, 8, seed=1), _rand(15, 5, seed=2)
    a = gk.pair_scores([x], [y], metric=metric)
    b = gk.pair_scores([y], [x], metric=metric)
    assert abs(float(a - b)) <= score_bound(metric, F64, 15, 8)


@pytest.mark.parametrize("metric", gk.METRICS)
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(metric):
    x, y = _rand(18, 10, seed=3), _rand(18, 6, seed=4)
    q = torch.linalg.qr(_rand(10, 10, seed=5))[0]
    base = gk.pair_scores([x], [y], metric=metric)
    moved = gk.pair_scores([3.7 * x @ q], [0.01 * y], metric=metric)
    assert abs(float(base - moved)) <= score_bound(metric, F64, 18, 10, c=16)  # x @ q: 10 more terms


def test_invariant_to_a_per_feature_offset():
    x, y = _rand(18, 10, seed=6), _rand(18, 6, seed=7)
    offset = _rand(1, 10, seed=8)
    assert abs(float(gk.cka(x, y) - gk.cka(x + offset, y))) <= score_bound("cka", F64, 18, 10, c=16)


def test_ranges():
    for seed in range(20):
        x, y = _rand(6, 4, seed=seed), _rand(6, 9, seed=seed + 100)
        c = float(gk.cka(x, y))
        d = float(gk.cka(x, y, debiased=True))
        p = float(gk.procrustes(x, y))
        a = float(gk.procrustes(x, y, angular=True))
        assert 0 <= c <= 1 and -1 <= d <= 1 and 0 <= p <= 2 and 0 <= a <= torch.pi / 2


@pytest.mark.parametrize("n,p,q", [(50, 3, 4), (5, 40, 30), (17, 17, 17)])
def test_sample_and_feature_forms_agree(n, p, q):
    x, y = _rand(n, p, seed=9, dtype=torch.float32), _rand(n, q, seed=10, dtype=torch.float32)
    a = gk.pair_scores([x], [y], form="sample")
    b = gk.pair_scores([x], [y], form="feature")
    # fp32 sums of p (sample form) or n (feature form) terms, then fp64 statistics
    assert abs(float(a - b)) <= bound(F32, max(n, p + q))


def test_form_choice_follows_the_cost_model():
    assert gk.choose_form(16384, 1024, 768) == "feature"
    assert gk.choose_form(256, 200704, 2048) == "sample"
    assert gk.choose_form(10, 3, 3) == "feature"  # 10*6 > 27


def test_procrustes_bounds_cka_relation():
    # ||Xnᵀ Yn||_* >= ||Xnᵀ Yn||_F = sqrt(CKA-numerator) / ...; so 1 - d²/2 >= CKA-ish lower bound
    x, y = _rand(30, 12, seed=11), _rand(30, 7, seed=12)
    nuc = 1 - float(gk.procrustes(x, y)) / 2
    xc, yc = x - x.mean(0), y - y.mean(0)
    fro = float(torch.linalg.norm(xc.T @ yc) / (torch.linalg.norm(xc) * torch.linalg.norm(yc)))
    assert nuc >= fro - 1e-12


@pytest.mark.parametrize(
    "metric,form", [("cka", "sample"), ("cka", "feature")] + [(m, "sample") for m in gk.METRICS[1:]]
)
def test_large_common_offset_keeps_fp32_accuracy(metric, form):
    """Deep plain-MLP layers share a large offset (||Kc|| / ||K|| ~ 1e-6): fp32 must still match
    fp64 (products use x - x[0], so centering does not cancel)."""
    g = torch.Generator().manual_seed(13)
    offset = 1e3 * torch.randn(1, 40, generator=g)
    x = offset + torch.randn(24, 40, generator=g)
    y = torch.randn(24, 2, generator=g) @ torch.randn(2, 30, generator=g) + 500.0
    kc = gk.centered_gram(x.double())
    k = x.double() @ x.double().T
    assert float(kc.norm() / k.norm()) < 1e-5  # the regime that broke raw-Gram centering
    want = gk.pair_scores([x.double()], [y.double()], metric=metric, form=form)
    xf, yf = x.float().requires_grad_(), y.float()
    got = gk.pair_scores([xf], [yf], metric=metric, form=form)
    # the shift is exact here (Sterbenz), so fp32 sums of 40 O(1) terms; debiased and Procrustes
    # amplify them through U-centering / the eigenvalue cut
    assert abs(float(got.detach()) - float(want)) <= score_bound(metric, F32, 24, 40, c=32), (float(got), float(want))
    (gx,) = torch.autograd.grad(got.sum(), (xf,))
    x64 = x.double().requires_grad_()
    (wx,) = torch.autograd.grad(gk.pair_scores([x64], [y.double()], metric=metric, form=form).sum(), (x64,))
    assert float((gx.double() - wx).abs().max() / wx.abs().max()) <= bound(F32, 40 + 24, c=128)


def test_procrustes_fp32_accurate_on_a_decaying_spectrum():
    """Realistic activations have heavy-tailed spectra: fp32 input must still match fp64 SVD
    (Procrustes builds fp64 Grams, so small singular values are not lost)."""
    from reference_math import procrustes as ref

    g = torch.Generator().manual_seed(21)
    decay = torch.logspace(0, -3, 512)
    x = torch.randn(256, 512, generator=g) * decay
    y = (x + 0.3 * torch.randn(256, 512, generator=g)) * decay
    for angular in (False, True):
        got = float(gk.procrustes(x, y, angular=angular))
        want = float(ref(x.double(), y.double(), angular=angular))
        assert abs(got - want) <= score_bound("procrustes", F32, 256, 512), (angular, got, want)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_feature_form_gradient_accurate_with_large_offset(offset):
    g = torch.Generator().manual_seed(22)
    x = (torch.randn(512, 16, generator=g) + offset * torch.randn(1, 16, generator=g)).requires_grad_()
    y = torch.randn(512, 12, generator=g)
    (gx,) = torch.autograd.grad(gk.pair_scores([x], [y], form="feature").sum(), (x,))
    x64 = x.detach().double().requires_grad_()
    (wx,) = torch.autograd.grad(gk.pair_scores([x64], [y.double()], form="feature").sum(), (x64,))
    # exact shift (Sterbenz), then fp32 sums of n = 512 samples; means in fp64
    assert float((gx.double() - wx).abs().max() / wx.abs().max()) <= bound(F32, 512, c=1)


def test_mixed_dtype_pair_in_feature_form_is_promoted():
    g = torch.Generator().manual_seed(23)
    x = torch.randn(40, 6, generator=g)
    y = torch.randn(40, 5, generator=g, dtype=torch.float64)
    got = gk.pair_scores([x], [y], form="feature")
    assert got.dtype == torch.float64
    want = gk.pair_scores([x.double()], [y], form="feature")
    assert abs(float(got - want)) <= bound(F64, 40 + 6 * 6)  # the same fp64 values, any order


def test_procrustes_non_finite_input_gives_nan_not_an_error():
    x = torch.randn(10, 5)
    x[0, 0] = float("nan")
    assert torch.isnan(gk.procrustes(x, torch.randn(10, 4)))
    assert torch.isnan(gk.cka(x, torch.randn(10, 4)))


def test_procrustes_is_not_silently_twice_differentiable():
    x = torch.randn(9, 7, requires_grad=True)
    d = gk.procrustes(x, torch.randn(9, 5))
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(d, (x,), create_graph=True)
    (gx,) = torch.autograd.grad(gk.procrustes(x, torch.randn(9, 5)), (x,))  # first order is fine
    assert torch.isfinite(gx).all()


def test_module_weights_survive_a_dtype_cast():
    crit = gk.GuidanceLoss(weights=[0.3, 0.1]).to(torch.bfloat16)
    xs = [torch.randn(8, 5), torch.randn(8, 6)]
    ys = [torch.randn(8, 4), torch.randn(8, 3)]
    want = gk.guidance_loss(xs, ys, weights=[0.3, 0.1])
    torch.testing.assert_close(crit(xs, ys), want, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["sample", "feature"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cka_non_finite_input_gives_nan_in_both_forms(form, bad):
    """Non-finite activations must not be reported as a (degenerate) CKA of 0: AMP's loss scaler
    needs the NaN to skip the step."""
    x = torch.randn(12, 6)
    x[3, 2] = bad
    loss = gk.guidance_loss([x], [torch.randn(12, 5)], form=form)
    assert torch.isnan(loss)
