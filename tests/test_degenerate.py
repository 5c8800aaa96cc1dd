"""Degenerate but valid input: finite, documented values and finite gradients (never NaN).

Documented (guidance_kernels.metrics): a representation with no variance across samples has
CKA 0 (loss 1), debiased CKA 0, Procrustes squared distance 2, and a zero gradient."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guidance_kernels as gk
from tolerance import bound, eps, score_bound

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _all_finite(metric, x, y):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    v = gk.pair_scores([x], [y], metric=metric)
    gx, gy = torch.autograd.grad(v.sum(), (x, y))
    return v.detach(), bool(torch.isfinite(v).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()), gx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", gk.METRICS)
def test_constant_and_zero_activations_have_the_documented_value(metric, dtype):
    y = torch.randn(10, 6).to(dtype)
    for x in (torch.full((10, 4, 3), 0.7, dtype=dtype), torch.zeros(10, 5, dtype=dtype), torch.relu(-torch.ones(10, 8)).to(dtype)):
        v, finite, gx = _all_finite(metric, x, y)
        assert finite
        expect = {"cka": 0.0, "debiased_cka": 0.0, "procrustes": 2.0, "angular_procrustes": torch.pi / 2}[metric]
        assert abs(float(v) - expect) <= bound(v.dtype, 1)  # π/2 rounded to the score's dtype
        assert float(gx.abs().max()) == 0.0


CASES = ["rank1", "duplicated_samples", "n2", "n3", "tiny_1e-20", "tiny_1e-15", "huge_1e4", "one_feature", "offset_1e3"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "metric,case",
    # debiased CKA needs n >= 4: n = 2, 3 are tested as errors in test_errors.py
    [(m, c) for m in gk.METRICS for c in CASES if not (m == "debiased_cka" and c in ("n2", "n3"))],
)
def test_degenerate_cases_are_finite(metric, dtype, case):
    g = torch.Generator().manual_seed(0)
    n = {"n2": 2, "n3": 3}.get(case, 12)
    x = torch.randn(n, 9, generator=g)
    y = torch.randn(n, 5, generator=g)
    if case == "rank1":
        x = torch.randn(n, 1, generator=g) @ torch.randn(1, 9, generator=g)
    elif case == "duplicated_samples":
        x = torch.cat([x[: n // 2], x[: n // 2]])
    elif case.startswith("tiny") or case.startswith("huge"):
        x = x * float(case.split("_")[1])
    elif case == "one_feature":
        x = x[:, :1]
    elif case == "offset_1e3":
        x = x + 1e3
    v, finite, _ = _all_finite(metric, x.to(dtype), y.to(dtype))
    assert finite, (case, v)


@pytest.mark.parametrize("metric", gk.METRICS)
def test_documented_scale_range(metric):
    """True value (and finite gradient) at every finite scale: inputs are rescaled by a power of
    two before any product (guidance_kernels._scaling), so tiny and huge activations are not
    constant and do not overflow."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, generator=g), torch.randn(16, 7, generator=g)
    want = float(gk.pair_scores([x.double()], [y.double()], metric=metric))
    for s in (1e-30, 1e-20, 1e-16, 1e-10, 1.0, 1e4, 1e8, 1e20, 1e30):
        for dtype in (torch.float32, torch.bfloat16):
            # inputs rounded to dtype (vs the fp64 truth of the unrounded ones), fp32 sums
            tol = score_bound(metric, torch.float32, 16, 20) + 4 * eps(dtype)
            v, finite, _ = _all_finite(metric, (x * s).to(dtype), y.to(dtype))
            assert finite and abs(float(v) - want) <= tol, (s, dtype, float(v), want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 12),
    p=st.integers(1, 10),
    q=st.integers(1, 10),
    rank=st.integers(0, 3),
    scale=st.sampled_from([0.0, 1e-20, 1e-8, 1.0, 1e4]),
    offset=st.sampled_from([0.0, 1.0, 1e3]),
    dtype=st.sampled_from(DTYPES),
    metric=st.sampled_from(gk.METRICS),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_inputs_never_give_nan(n, p, q, rank, scale, offset, dtype, metric, seed):
    if metric == "debiased_cka" and n < 4:
        n = 4
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, max(rank, 1), generator=g) @ torch.randn(max(rank, 1), p, generator=g)
    if rank == 0:
        x = torch.zeros(n, p)
    x = x * scale + offset
    y = torch.randn(n, q, generator=g)
    v, finite, _ = _all_finite(metric, x.to(dtype), y.to(dtype))
    assert finite
    lo, hi = {"cka": (0, 1), "debiased_cka": (-1, 1), "procrustes": (0, 2), "angular_procrustes": (0, 1.5708)}[metric]
    slack = score_bound(metric, torch.float32, 12, 10)  # rounding may step just past a bound
    assert lo - slack <= float(v) <= hi + slack
