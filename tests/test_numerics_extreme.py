"""Numerics at the edges: mixed-precision pairs (one side fp64) computed in fp64 under fp64's
rules, finite but extreme magnitudes rescaled before any product, and memory estimated up front.
Every value is checked against the float64 truth of tests/reference_math.py, evaluated on the
same numbers divided by an exact power of two (the truth of the textbook formulas would
overflow at 1e200 as the old code did)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guidance_kernels as gk
import reference_math as R
from tolerance import eps, rel, score_bound

FORMS = {"cka": ("auto", "sample", "feature"), "debiased_cka": ("auto", "sample", "feature"),
         "procrustes": ("sample",), "angular_procrustes": ("sample",)}


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp64 divided by the power of two nearest its largest entry (exact)."""
    t = t.detach().double()
    m = float(t.abs().max())
    return t if m == 0 else t * 2.0 ** -math.floor(math.log2(m))


def _truth(metric, x, y):
    return float(R.METRIC_FNS[metric](_unit(x), _unit(y)))


def _u_cond(t: torch.Tensor) -> float:
    """``||K~||_F / ||U(K)||_F`` of ``t``'s Gram: how much U-centering cancels (debiased CKA's
    rounding errors scale with it; about 1-3 for random input, large at n = 4)."""
    t = _unit(t).reshape(t.shape[0], -1)
    t = t - t.mean(0)
    n = t.shape[0]
    k = t @ t.T
    k = k - torch.diag(torch.diag(k))
    u = k - k.sum(1, keepdim=True) / (n - 2) - k.sum(0, keepdim=True) / (n - 2) + k.sum() / ((n - 1) * (n - 2))
    u = u - torch.diag(torch.diag(u))
    return float(k.norm() / u.norm().clamp_min(1e-300))


def _tol(metric, x, y, acc):
    n, p = x.shape[0], max(x[0].numel(), y[0].numel())
    b = score_bound(metric, acc, n, p)
    if metric == "debiased_cka":  # U-centering cancels: its rounding errors grow by the ratio
        b *= max(1.0, _u_cond(x)) * max(1.0, _u_cond(y))
    return b


def _score_and_grads(metric, x, y, form="auto"):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    v = gk.pair_scores([x], [y], metric=metric, form=form)[0]
    gx, gy = torch.autograd.grad(v, (x, y))
    return v.detach(), gx, gy


# ------------------------------------------------------------------ the examples
@pytest.mark.parametrize("scale", [1e-20, 3e-23, 1e-38])
def test_mixed_pair_tiny_fp32_side_value_and_gradient(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64, generator=g)
    y = torch.randn(8, 3, generator=g) * scale
    v, gx, gy = _score_and_grads("cka", x, y)
    assert v.dtype == torch.float64 and gy.dtype == torch.float32
    want = _truth("cka", x, y)
    assert abs(float(v) - want) <= _tol("cka", x, y, torch.float64), (float(v), want)
    # the fp64 gradient of the truth, on the unit-scaled y, scaled back by the chain rule
    s = 2.0 ** -math.floor(math.log2(float(y.abs().max())))
    yu = (y.double() * s).requires_grad_()
    (want_gy,) = torch.autograd.grad(R.cka(x, yu), yu)
    assert torch.isfinite(gy).all() and torch.isfinite(gx).all()
    assert rel(gy.double() / s, want_gy) <= 1e3 * eps(torch.float32)  # gy rounded to fp32 once


def test_mixed_pair_debiased_exact_zero_u_centered_gram_is_degenerate():
    """An fp32 y whose U-centred Gram is exactly 0 (diagonal Gram) has debiased CKA 0 against
    fp64 x, as against fp32 x, with a zero gradient (documented degenerate value)."""
    y = torch.diag(torch.tensor([0.1, 0.37, 1.3, 2.9]))
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for xx in (x, x.float()):
        v, gx, gy = _score_and_grads("debiased_cka", xx, y)
        assert float(v) == 0.0 and float(gx.abs().max()) == 0.0 and float(gy.abs().max()) == 0.0


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_with_one_fp64_member_matches_pairwise(debiased):
    g = torch.Generator().manual_seed(2)
    members = [torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g) * 1e-20,
               torch.randn(12, 4, dtype=torch.float64, generator=g),
               torch.diag(torch.tensor([0.1, 0.37, 1.3, 2.9] * 3))]
    m = gk.cka_matrix(members, debiased=debiased)
    assert m.dtype == torch.float64 and torch.isfinite(m).all()
    metric = "debiased_cka" if debiased else "cka"
    for i, a in enumerate(members):
        for j, b in enumerate(members):
            want = float(gk.pair_scores([a.double()], [b.double()], metric=metric)[0])
            assert abs(float(m[i, j]) - want) <= _tol(metric, a, b, torch.float64), (i, j)
    if debiased:
        assert float(m[3].abs().max()) == 0.0  # U-centred Gram exactly 0: degenerate member


@pytest.mark.parametrize("metric", gk.METRICS)
@pytest.mark.parametrize("dtype,scales", [
    (torch.float32, [1e20, 1e-30, 3.3e38, 1e-40]),
    (torch.bfloat16, [1e20, 3e38, 1e-30]),
    (torch.float64, [1e200, 1.7e308, 1e-300]),
])
def test_extreme_magnitudes_give_the_true_value_and_finite_gradients(metric, dtype, scales):
    g = torch.Generator().manual_seed(3)
    x0, y = torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randn(8, 3, dtype=torch.float64, generator=g)
    for s in scales:
        x = ((x0 / x0.abs().max()) * s).to(dtype)  # largest entry exactly ~s: 3.3e38 is fp32's edge
        assert torch.isfinite(x).all()
        for form in FORMS[metric]:
            for yy in (y.to(dtype), y):  # same dtype, and a mixed pair when dtype is not fp64
                v, gx, gy = _score_and_grads(metric, x, yy, form)
                acc = torch.float64 if torch.float64 in (x.dtype, yy.dtype) else torch.float32
                want = _truth(metric, x, yy)
                assert abs(float(v) - want) <= _tol(metric, x, yy, acc), (s, form, yy.dtype, float(v), want)
                # d score / dx ~ 1/|x|: at fp32 subnormal |x| ~ 1e-40 the true gradient (~1e40)
                # is beyond fp32's range itself, so only the value is checked there
                if s * torch.finfo(dtype).max > 1:
                    assert torch.isfinite(gx).all() and torch.isfinite(gy).all(), (s, form)


def test_extreme_magnitudes_in_guidance_loss_and_cka_matrix():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    want = _truth("cka", x, y)
    for s in (1e20, 1e-30):
        loss = gk.guidance_loss([x * s, x], [y, y / s], reduction="none")
        assert torch.allclose(1 - loss.double(), torch.tensor([want, want], dtype=torch.float64),
                              rtol=0, atol=_tol("cka", x, y, torch.float32))
        m = gk.cka_matrix([x * s], [y, y * s])
        assert float((m.double() - want).abs().max()) <= _tol("cka", x, y, torch.float32)


def test_ordinary_inputs_are_unchanged_bit_for_bit():
    """Inside the window the factor is exactly 1: scores equal those of the input times 2^k
    (power-of-two scaling is exact) and nothing is rescaled."""
    from guidance_kernels._scaling import scale_factor

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 7, generator=g), torch.randn(9, 3, generator=g)
    for s in (2.0 ** -14, 1.0, 2.0 ** 12):
        assert float(scale_factor(x * s)) == 1.0
    assert float(scale_factor(x * 1e20)) != 1.0 and float(scale_factor(x * 1e-20)) != 1.0
    assert float(scale_factor(torch.full((4, 3), 5.0))) == 1.0  # constant: untouched
    a = gk.pair_scores([x, x * 2.0 ** 10], [y, y], form="sample")
    assert float(a[0]) == float(a[1])


# ------------------------------------------------------------------ fuzz
_MAG = {torch.float32: (-35, 35), torch.bfloat16: (-35, 35), torch.float16: (-3, 4), torch.float64: (-290, 290)}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(4, 10),
    p=st.integers(1, 7),
    q=st.integers(1, 7),
    dx=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    dy=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    ex=st.floats(0, 1),
    ey=st.floats(0, 1),
    metric=st.sampled_from(gk.METRICS),
    seed=st.integers(0, 2**16),
)
def test_fuzz_mixed_dtypes_and_extreme_magnitudes_match_the_fp64_truth(n, p, q, dx, dy, ex, ey, metric, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = _MAG[dx]
    x = (torch.randn(n, p, dtype=torch.float64, generator=g) * 10.0 ** (lo + ex * (hi - lo))).to(dx)
    lo, hi = _MAG[dy]
    y = (torch.randn(n, q, dtype=torch.float64, generator=g) * 10.0 ** (lo + ey * (hi - lo))).to(dy)
    form = "feature" if metric == "cka" and seed % 3 == 0 else "auto"
    v, gx, gy = _score_and_grads(metric, x, y, form)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    acc = torch.float64 if torch.float64 in (dx, dy) else torch.float32
    want = _truth(metric, x, y)  # the truth of the numbers the call saw (rounded to dx, dy)
    # near-degenerate random input (e.g. p = 1 with ties after rounding to fp16) may be judged
    # degenerate by the documented rule: then the documented value is the answer
    documented = {"cka": 0.0, "debiased_cka": 0.0, "procrustes": 2.0, "angular_procrustes": math.pi / 2}[metric]
    tol = _tol(metric, x, y, acc)
    assert abs(float(v) - want) <= tol or float(v) == pytest.approx(documented, abs=tol), (float(v), want)


# ------------------------------------------------------------------ memory, estimated up front
BIG_N = 100_000


@pytest.fixture
def budget_1gb(monkeypatch):
    monkeypatch.setenv("GUIDANCE_KERNELS_MAX_BYTES", "1e9")


def test_debiased_auto_at_large_n_takes_the_feature_form(budget_1gb):
    """Debiased CKA has a feature form (no n x n Gram): form='auto' at n = 100,000 fits the budget
    and equals the fp64 value of the same estimator."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BIG_N, 8, generator=g), torch.randn(BIG_N, 4, generator=g)
    y = y + 0.5 * x[:, :4]
    got = gk.cka(x, y, debiased=True)
    want = gk.pair_scores([x.double()], [y.double()], metric="debiased_cka", form="feature")[0]
    assert torch.isfinite(got)
    assert abs(got.double() - want).item() <= score_bound("debiased_cka", torch.float32, BIG_N, 8)


@pytest.mark.parametrize("call,where", [
    (lambda x, y: gk.pair_scores([x], [y], form="sample"), r"pair 0 \(target \(100000, 8\), guide \(100000, 4\)\)"),
    (lambda x, y: gk.pair_scores([x], [y], metric="debiased_cka", form="sample"), r"pair 0 .*debiased_cka"),
    (lambda x, y: gk.procrustes(x, y), r"pair 0 .*procrustes"),
    (lambda x, y: gk.guidance_loss([y[:50], x], [y[:50], y], metric="angular_procrustes"), r"pair 1 \(target \(100000, 8\)"),
    (lambda x, y: gk.cka_matrix([x, y]), r"cka_matrix"),
    (lambda x, y: gk.centered_gram(x), r"centered_gram\(x\)"),
])
def test_sample_form_at_large_n_raises_before_allocating(call, where, budget_1gb):
    x, y = torch.randn(BIG_N, 8), torch.randn(BIG_N, 4)
    with pytest.raises(ValueError, match=where) as err:
        call(x, y)
    assert re.search(r"needs about [0-9.e+]+ bytes.*budget of 1e\+09 bytes.*smaller batch", str(err.value)), err.value


def test_default_budget_is_the_device_memory_and_still_refuses_100k_grams(monkeypatch):
    monkeypatch.delenv("GUIDANCE_KERNELS_MAX_BYTES", raising=False)
    x, y = torch.randn(BIG_N, 8), torch.randn(BIG_N, 4)  # 4e10 bytes per fp32 Gram
    with pytest.raises(ValueError, match=r"form='feature'"):
        gk.pair_scores([x], [y], form="sample")


def test_mixed_dtypes_do_not_force_the_sample_form(budget_1gb):
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(BIG_N, 8, dtype=torch.float64, generator=g), torch.randn(BIG_N, 4, generator=g)
    v = gk.cka(x, y)  # feature form: 8 x 4 products, not 100000^2 Grams
    xc, yc = x - x.mean(0), y.double() - y.double().mean(0)  # the textbook feature-space CKA
    want = float((xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert abs(float(v) - want) <= _tol("cka", x, y, torch.float64)


def test_feature_form_with_huge_p_raises(budget_1gb):
    x, y = torch.randn(8, BIG_N), torch.randn(8, 10)
    with pytest.raises(ValueError, match=r"pair 0 .*p x p, q x q, p x q = 100000 x 10.*form='sample'"):
        gk.pair_scores([x], [y], form="feature")


def test_budget_variable_is_validated_and_obeyed(monkeypatch):
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    monkeypatch.setenv("GUIDANCE_KERNELS_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match=r"GUIDANCE_KERNELS_MAX_BYTES='lots' is not a number"):
        gk.cka(x, y)
    monkeypatch.setenv("GUIDANCE_KERNELS_MAX_BYTES", "-5")
    with pytest.raises(ValueError, match=r"must be a positive number"):
        gk.cka(x, y)
    monkeypatch.setenv("GUIDANCE_KERNELS_MAX_BYTES", "1000")
    with pytest.raises(ValueError, match=r"budget of 1e\+03 bytes"):
        gk.pair_scores([x], [y], form="sample")
    monkeypatch.setenv("GUIDANCE_KERNELS_MAX_BYTES", "1e9")
    assert torch.isfinite(gk.pair_scores([x], [y], form="sample")).all()


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e-20), (torch.float64, 1e200)])
def test_extreme_magnitude_with_a_shared_offset(dtype, scale):
    """Deep-layer-like input (a large offset shared by all samples, spread 1e-3 of it) at an
    extreme magnitude: the rescaling and the backends' row shift compose."""
    g = torch.Generator().manual_seed(7)
    x = ((1 + 1e-3 * torch.randn(12, 6, dtype=torch.float64, generator=g)) * scale).to(dtype)
    y = torch.randn(12, 4, dtype=torch.float64, generator=g).to(dtype)
    for metric in gk.METRICS:
        v, gx, _ = _score_and_grads(metric, x, y)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        # the truth of x - x[0] (exact in fp64 by Sterbenz: entries within a factor 2): the
        # textbook formulas on raw Grams would lose (offset / spread)^2 eps to cancellation
        xs = x.double() - x.double()[:1]
        assert abs(float(v) - _truth(metric, xs, y)) <= _tol(metric, x, y, acc), (metric, float(v))
        assert torch.isfinite(gx).all()
