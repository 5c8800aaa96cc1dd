"""Pairs grouped by shape and dtype into one op call per group (``planning.group_by``,
``functional``): scores and gradients come back in pair order on random mixed calls, fp64 CKA
is scale invariant over fp64's range, and an fp32 pair's score does not depend on an fp64 pair
in the same call (both were regressions once)."""

import random

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels.backends import resolve_backend

from reference_math import cka as cka64
from reference_math import debiased_cka as dcka64
from tolerance import eps, score_bound


def _backends():
    out = ["reference"]
    try:
        resolve_backend("triton", [torch.zeros(1)])
        out.append("triton")
    except Exception:  # noqa: BLE001 - triton unusable here
        pass
    return out


def _mixed_call(seed):
    """Pairs of several n and dtypes, interleaved; one guide tensor shared by two pairs, one
    target used twice; only some inputs require grad."""
    torch.manual_seed(seed)
    g9 = torch.randn(9, 4, dtype=torch.float64)
    t5 = (torch.randn(5, 3) + 2).requires_grad_()
    xs = [
        (torch.randn(9, 6) + 3).requires_grad_(),
        t5,
        torch.randn(9, 40, dtype=torch.float64).requires_grad_(),
        torch.randn(5, 2).to(torch.bfloat16).requires_grad_(),
        torch.randn(9, 3),  # no grad
        t5,
        torch.randn(12, 2).requires_grad_(),
    ]
    ys = [
        g9,
        torch.randn(5, 40).requires_grad_(),
        g9,
        torch.randn(5, 3, dtype=torch.float64),
        g9.float(),
        torch.randn(5, 2),
        torch.randn(12, 2),
    ]
    return xs, ys


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("metric,form", [("cka", "auto"), ("cka", "sample"), ("cka", "feature"), ("debiased_cka", "auto")])
def test_scores_and_gradients_in_pair_order(backend, metric, form):
    """Scores come back in pair order and gradients match an independent fp64 computation, for a
    call mixing n, dtypes, forms, duplicated tensors and partial requires_grad (_take/_assemble,
    _rows/_pick/_scatter)."""
    xs, ys = _mixed_call(0)
    w = torch.tensor([0.3, -1.1, 0.7, 1.9, -0.4, 1.3, 0.9], dtype=torch.float64)
    got = gk.pair_scores(xs, ys, metric=metric, backend=backend, form=form)
    f = dcka64 if metric == "debiased_cka" else cka64
    want = torch.stack([f(x.detach(), y.detach()) for x, y in zip(xs, ys)])
    # fp32 sums (n <= 12, p <= 40) of the same values; Triton shifts a bf16 pair in bf16 (one
    # rounding of every shifted value)
    tol = score_bound(metric, torch.float32, 12, 40) + (2 * eps(torch.bfloat16) if backend == "triton" else 0.0)
    assert float((got.detach().double() - want).abs().max()) <= tol
    leaves = list({id(t): t for t in xs + ys if t.requires_grad}.values())
    gg = torch.autograd.grad((got.double() * w).sum(), leaves)
    gw = torch.autograd.grad((torch.stack([f(x, y) for x, y in zip(xs, ys)]) * w).sum(), leaves)
    for t, a, b in zip(leaves, gg, gw):
        gtol = 16 * tol + 4 * eps(t.dtype)  # and one rounding to the leaf's dtype
        assert float((a.double() - b.double()).abs().max()) <= gtol * float(b.abs().max())


def test_random_mixed_calls_reference():
    """Fuzz of the grouping over 60 random calls (reference backend): values in pair order."""
    for seed in range(60):
        rng = random.Random(seed)
        torch.manual_seed(seed)
        xs, ys = [], []
        for _ in range(rng.randint(1, 6)):
            n = rng.choice([3, 5, 9])
            dt = rng.choice([torch.float32, torch.float64])
            xs.append(torch.randn(n, rng.choice([1, 3, 40]), dtype=dt) + 1)
            same = [y for y in ys if y.shape[0] == n]
            ys.append(rng.choice(same) if same and rng.random() < 0.4 else torch.randn(n, rng.choice([2, 40])))
        form = rng.choice(["auto", "sample", "feature"])
        got = gk.pair_scores(xs, ys, backend="reference", form=form)
        want = torch.stack([cka64(x, y) for x, y in zip(xs, ys)])
        err = float((got.double() - want).abs().max())
        assert err <= score_bound("cka", torch.float32, 9, 40), f"seed {seed}: {err}"


@pytest.mark.parametrize("form", ["sample", "feature"])
@pytest.mark.parametrize("scale", [1e-60, 1e60])
def test_fp64_cka_is_scale_invariant(form, scale):
    """fp64 Grams are trace-normalized before the fp64 sums (review finding: un-normalized
    ΣK∘K·ΣL∘L left fp64's range beyond |x| ~ 1e±38)."""
    torch.manual_seed(0)
    x0 = torch.randn(16, 10, dtype=torch.float64)
    y0 = torch.randn(16, 10, dtype=torch.float64) + x0
    want = gk.pair_scores([x0], [y0], form=form, backend="reference")[0]
    x = (x0 * scale).requires_grad_()
    got = gk.pair_scores([x], [y0 * scale], form=form, backend="reference")[0]
    tol = score_bound("cka", torch.float64, 16, 10, c=64)  # x0 * 1e±60 rounds every entry once
    assert abs(float(got - want)) <= tol
    (g,) = torch.autograd.grad(got, x)
    (g0,) = torch.autograd.grad(gk.pair_scores([x0.requires_grad_()], [y0], form=form, backend="reference")[0], x0)
    assert float((g * scale - g0).abs().max()) <= 16 * tol * float(g0.abs().max())


def test_fp32_pair_score_does_not_depend_on_an_fp64_pair_in_the_same_call():
    """Pairs are batched per (n, Gram dtypes), so an fp32 pair keeps fp32's degenerate rule
    (review finding: grouping by n only promoted it to fp64)."""
    torch.manual_seed(0)
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    x = (3 * q + 0.37).float()  # Kc = 9 H up to fp32 rounding: U(Kc) is rounding noise
    y = torch.randn(n, 7)
    alone = gk.pair_scores([x], [y], metric="debiased_cka", backend="reference")
    assert alone[0] == 0  # degenerate by the fp32 rule
    z, w = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 6, dtype=torch.float64)
    both = gk.pair_scores([x, z], [y, w], metric="debiased_cka", backend="reference")
    assert both[0] == alone[0]


def test_mixed_pairs_share_one_promoted_copy_of_a_shared_guide():
    """A guide shared by two mixed (fp64 target, fp32 guide) pairs is promoted once: one fp64
    tensor, so its Gram is computed once (identity de-duplication downstream)."""
    from guidance_kernels.functional import _cast_pairs, _promote_pair

    y = torch.randn(8, 3)
    xs, ys = _cast_pairs([torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)],
                         [y, y], _promote_pair)
    assert ys[0] is ys[1] and ys[0].dtype == torch.float64
    assert torch.equal(ys[0], y.double())
