"""Tolerances that hold on any CPU or GPU, stated from the dtype's eps, the reduction length and
the operands' scale (never an absolute number tuned on one machine).

A floating-point sum of ``k`` terms accumulated in a dtype with unit roundoff ``u = eps / 2`` has
error at most ``γ_k Σ|terms|`` with ``γ_k = k u / (1 - k u)`` (Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1), whatever the order: blocked BLAS, FMA, vector lanes, split-K. Two
results of different summation orders are then within ``2 γ_k Σ|terms| <= k · eps · scale``
(``scale`` bounding ``Σ|terms|``). Results derived through a few more steps (centering, CKA from
Grams) get a small constant ``c`` on top. Bugs move results by O(1) relative amounts, far above
these bounds, so the tests keep their power.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["eps", "bound", "abs_scale", "abs_product", "assert_within", "assert_entrywise", "rel", "score_bound", "frob_bound"]


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def bound(dtype: torch.dtype, k: int = 1, c: float = 4.0) -> float:
    """Relative error bound ``c · k · eps(dtype)`` for a result of ``k``-term sums in ``dtype``."""
    return c * max(int(k), 1) * eps(dtype)


def abs_scale(a: Tensor, b: Tensor | None = None) -> float:
    """Largest entry of ``|a| |b|ᵀ`` (``|a| |a|ᵀ`` when ``b`` is None) in fp64: the ``Σ|terms|`` of
    the rows-of-``a``-by-rows-of-``b`` products."""
    a = a.detach().double().abs()
    b = a if b is None else b.detach().double().abs()
    return float((a @ b.T).max())


def rel(got: Tensor, want: Tensor) -> float:
    """Frobenius relative error ``||got - want|| / ||want||`` in fp64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def assert_within(got: Tensor, want: Tensor, *, dtype: torch.dtype, k: int = 1, scale: float | None = None,
                  c: float = 4.0, msg: str = "") -> None:
    """Entry-wise ``|got - want| <= bound(dtype, k, c) · scale``; ``scale`` defaults to
    ``max|want|`` (for results whose size bounds their summands)."""
    got_d, want_d = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    if scale is None:
        scale = float(want_d.abs().max()) if want_d.numel() else 0.0
    tol = bound(dtype, k, c) * max(scale, torch.finfo(torch.float64).tiny)
    err = float((got_d - want_d).abs().max()) if want_d.numel() else 0.0
    assert err <= tol, f"{msg} max |got - want| = {err:.3e} > {tol:.3e} (dtype {dtype}, k {k}, scale {scale:.3e}, c {c})"


def abs_product(a: Tensor, b: Tensor) -> Tensor:
    """``|a| @ |b|`` in fp64: entry by entry, the ``Σ|terms|`` of the product ``a @ b``."""
    return a.detach().double().abs() @ b.detach().double().abs()


def centered_scale(scale: Tensor) -> Tensor:
    """The ``Σ|terms|`` of ``H K H`` (``H = I - 11ᵀ/n``) entry by entry, given ``scale`` (n, n), the
    ``Σ|terms|`` of ``K``'s entries: ``(I + 11ᵀ/n) scale (I + 11ᵀ/n)`` (centring mixes every row and
    column into each entry, so a zero row of ``scale``, e.g. the shifted row 0, does not make the
    centred entry exact)."""
    s = scale.double()
    a = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device) + 1.0 / s.shape[-1]
    return a @ s @ a


def assert_entrywise(got: Tensor, want: Tensor, scale: Tensor, *, k: int, input_dtype: torch.dtype = torch.float32,
                     acc_dtype: torch.dtype = torch.float32, c: float = 2.0, msg: str = "") -> None:
    """``|got - want| <= c (k eps(acc_dtype) + eps(input_dtype)) scale`` entry by entry: the
    rigorous bound for ``k``-term sums accumulated in ``acc_dtype`` of operands rounded once to
    ``input_dtype`` (e.g. a row shift done in bf16), with ``scale`` the ``Σ|terms|`` of each
    entry (:func:`abs_product`)."""
    got_d, want_d = got.detach().double(), want.detach().double()
    tol = c * (max(int(k), 1) * eps(acc_dtype) + eps(input_dtype)) * scale.double().expand_as(want_d)
    err = (got_d - want_d).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), (
        f"{msg} {int(bad.sum())} of {bad.numel()} entries off; worst err/tol "
        f"{float((err / tol.clamp_min(1e-300)).max()):.3g} (k {k}, input {input_dtype}, acc {acc_dtype}, c {c})"
    )


def score_bound(metric: str, dtype: torch.dtype, n: int, p: int, c: float = 4.0) -> float:
    """Absolute bound for an O(1) score (CKA, Procrustes distance) of ``n`` samples with ``p``
    features (the longer side) accumulated in ``dtype``: ``p``-term sums into a Gram (or
    ``n``-term ones into a cross-covariance) and ``n``-term centering sums in ``dtype``, then the
    statistics' ``n²`` (or ``p²``) terms in fp64. Procrustes adds its eigenvalue cut: up to ``n``
    eigenvalues at the cut ``n eps λ_max`` of its fp64 Grams, each worth ``sqrt(n eps64)``."""
    b = bound(dtype, max(n, p) + 2 * n, c) + bound(torch.float64, n * n + p * p, c)
    if "procrustes" in metric:
        b += n * math.sqrt(n * eps(torch.float64))
    return b


def frob_bound(dtype: torch.dtype, k: int, c: float = 8.0) -> float:
    """Relative Frobenius-norm bound ``c (sqrt(k) eps32 + eps(dtype))`` for results of ``k``-term
    fp32 sums of operands rounded once to ``dtype``, for the GPU tests' full-size workloads
    (k up to 2e5) where the worst case ``k eps`` says nothing. Model: errors of independent
    random-sign rounding grow like ``sqrt(k)`` (what blocked and split-K sums show); the CPU tests
    use the rigorous entry-wise bound (:func:`assert_entrywise`) instead."""
    return c * (math.sqrt(max(int(k), 1)) * eps(torch.float32) + eps(dtype))
