"""Small math shared by every backend: from centered products to CKA / Procrustes scores.

Everything here is ``O(n^2)`` (or ``O(p q)``) plain PyTorch on the outputs of the heavy ops in
:mod:`guidance_kernels.ops` (centered Grams ``Kc = H X Xᵀ H``, or centered feature-space
products), batched over a leading layer dimension and differentiable: autograd turns
``d score / d Kc`` into the ``dK`` the op's backward consumes (``docs/design.md``).

Numerics and degenerate input (documented behaviour):

* The ops center products of the row-shifted activation ``x - 1 x[0]``, so a large offset
  shared by all samples (deep layers of a plain MLP) costs no accuracy.
* Centered Grams are divided by their trace (``||Xc||_F^2``), held constant under autograd:
  every metric is scale invariant (degree-0 homogeneous), so that is exact, and it keeps squares
  and gradients in range. A representation with ``||Xc||_F^2 <= tiny/eps`` of the accumulation
  dtype (``||Xc||_F`` below about 3e-16 in fp32, 1e-146 in fp64) counts as constant.
* The public functions (:mod:`guidance_kernels.functional`) first rescale every input by a
  power of two on the device (:mod:`guidance_kernels._scaling`), so at that level any finite
  magnitude (fp32 up to 3.4e38 or down to subnormals, fp64 up to 1.8e308) gives the true score;
  the floor below applies to Grams handed to these functions directly.
* A pair whose sides accumulate in different dtypes (one side fp64) is computed in fp64 on both
  sides and judged by fp64's rule (the narrower side's numbers are exact in fp64).
* A *degenerate* representation has no variance across samples (constant, dead ReLU, all-zero,
  or below that floor); for debiased CKA also one whose U-centered Gram is rounding noise
  (``||U(K)|| <= 64 eps ||K~c||``). A degenerate pair has CKA = 0 (guidance loss 1), debiased
  CKA = 0, Procrustes similarity 0 (squared distance 2, angle π/2), and a zero gradient.
  Values and gradients are finite for every input.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TOL_ULPS = 64.0


def tolerance(dtype: torch.dtype) -> float:
    """Relative size below which a centered Gram counts as zero (see module doc)."""
    return _TOL_ULPS * torch.finfo(dtype).eps


def _trace(k: Tensor) -> Tensor:
    return k.diagonal(dim1=-2, dim2=-1).sum(-1)


def _inv_scale(tr: Tensor) -> Tensor:
    """``1 / tr`` as a constant (detached), or 0 where ``tr`` is at the underflow floor."""
    tr = tr.detach()
    fi = torch.finfo(tr.dtype)
    ok = tr > fi.tiny / fi.eps
    return torch.where(ok, 1 / torch.where(ok, tr, torch.ones_like(tr)), torch.zeros_like(tr))


def normalize_gram(k: Tensor) -> Tensor:
    """(..., n, n) PSD (centered) Gram divided by its trace, the divisor held constant under
    autograd; zero at or below the underflow floor."""
    return k * _inv_scale(_trace(k))[..., None, None]


def center_gram(k: Tensor) -> Tensor:
    """``H K H`` for (..., n, n) ``K``, from row/column means (no ``n x n`` H is formed)."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def center_gram_(k: Tensor) -> Tensor:
    """:func:`center_gram` in place on a fresh (..., n, n) ``k`` the caller owns (no autograd
    through it), the same operations in the same order, so bit for bit the same; returns ``k``."""
    r, c, m = k.mean(-1, keepdim=True), k.mean(-2, keepdim=True), k.mean((-2, -1), keepdim=True)
    return k.sub_(r).sub_(c).add_(m)


def u_center_gram(k: Tensor) -> Tensor:
    """U-centering (Szekely & Rizzo) of (..., n, n) ``K``, n >= 4: ``<U(K), U(L)> / (n (n-3))``
    is the unbiased HSIC estimator of Song et al. (2012). The row / column sums of ``K`` with its
    diagonal zeroed come from ``K``'s sums minus the diagonal (no zeroed copy), and the result is
    built in one fresh tensor (5 passes over ``K``)."""
    n = k.shape[-1]
    d = k.diagonal(dim1=-2, dim2=-1)
    rows, cols = k.sum(-1) - d, k.sum(-2) - d
    t = rows.sum(-1, keepdim=True) / ((n - 1) * (n - 2))
    u = (k - (rows / (n - 2)).unsqueeze(-1)).sub_((cols / (n - 2)).unsqueeze(-2)).add_(t.unsqueeze(-1))
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def _frob2_off_diagonal(k: Tensor) -> Tensor:
    """``||K - diag(K)||_F^2`` without the zeroed copy (a reference scale: clamped at 0)."""
    d = k.diagonal(dim1=-2, dim2=-1)
    return (_frob2(k) - (d * d).sum(-1)).clamp(min=0)


def _cosine(s: Tensor, a2: Tensor, b2: Tensor, ra2: Tensor, rb2: Tensor) -> Tensor:
    """``s / sqrt(a2 b2)`` with the degenerate guard: 0 (and zero gradient) when ``a2`` or
    ``b2`` is at or below ``tol^2`` times its reference ``ra2`` / ``rb2``."""
    tol2 = tolerance(s.dtype) ** 2
    deg = (a2 <= tol2 * ra2) | (b2 <= tol2 * rb2)
    den = torch.sqrt(torch.where(deg, torch.ones_like(a2), a2 * b2))
    return torch.where(deg, torch.zeros_like(s), s / den)


def _frob2(k: Tensor) -> Tensor:
    return torch.linalg.vecdot(k.flatten(-2), k.flatten(-2))


def cka_from_grams(kc: Tensor, lc: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA from centered Grams ``kc = H X Xᵀ H``, ``lc`` of shape (..., n, n) -> (...,).

    ``debiased=True`` uses U-centering (needs n >= 4; U-centering ignores the double
    centering) and lies in [-1, 1]; otherwise [0, 1], from :func:`gram_stats` and
    :func:`cka_from_stats` (the math of the fused ``ops.gram_stats`` path)."""
    if not debiased:
        k, l = stats_ready(kc, lc)
        return cka_from_stats(gram_stats(k, l), kc.dtype).to(kc.dtype)
    k, l = normalize_gram(kc), normalize_gram(lc)
    ku, lu = u_center_gram(k), u_center_gram(l)
    rk, rl = _frob2_off_diagonal(k), _frob2_off_diagonal(l)
    return _cosine((ku * lu).sum((-2, -1)), _frob2(ku), _frob2(lu), rk, rl)


def gram_stats(k: Tensor, l: Tensor) -> Tensor:
    """(..., n, n) centered Grams -> (..., 5) fp64 ``(Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)`` (fp64
    Gram-sized temporaries: products of fp32 values are exact in fp64 and cannot overflow).
    The reference implementation of ``ops.gram_stats``."""
    kd, ld = k.double(), l.double()
    return torch.stack([_frob_dot(kd, ld), _frob2(kd), _frob2(ld), _trace(kd), _trace(ld)], -1)


def _frob_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((-2, -1))


def stats_ready(k: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """Grams as :func:`gram_stats` needs them: fp64 Grams trace-normalized (``ΣK∘K ΣL∘L`` of
    raw fp64 Grams leaves fp64's range beyond ``|x| ~ 1e±38``), fp32 ones as they are."""
    if k.dtype == torch.float64:
        return normalize_gram(k), normalize_gram(l)
    return k, l


def cka_from_stats(st: Tensor, gram_dtype: torch.dtype) -> Tensor:
    """Linear CKA from ``st = (Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)`` (..., 5) fp64 of centered
    Grams of ``gram_dtype`` (``ops.gram_stats``) -> (...,) fp64. The same value, degenerate
    rule and gradient as :func:`cka_from_grams` (a trace at or below the floor, or a zero Gram,
    gives 0 and a zero gradient; NaN/inf stay NaN). fp64 sums of fp32 Grams need no
    normalization for range; fp64 Grams must be trace-normalized first (``normalize_gram``)."""
    kl, kk, ll, tk, tl_ = st.unbind(-1)
    fi = torch.finfo(gram_dtype)
    floor = fi.tiny / fi.eps
    kkll = kk * ll
    deg = (torch.minimum(tk, tl_) <= floor) | (kkll <= 0)  # False for NaN: non-finite stays NaN
    return torch.where(deg, 0.0, kl / torch.sqrt(torch.where(deg, 1.0, kkll)))


def cka_from_cross(ac: Tensor, bc: Tensor, cc: Tensor) -> Tensor:
    """Linear CKA from centered feature-space products ``ac = Xcᵀ Xc`` (..., p, p),
    ``bc = Ycᵀ Yc`` (..., q, q), ``cc = Xcᵀ Yc`` (..., p, q) -> (...,). Equals
    :func:`cka_from_grams` (``||Xcᵀ Yc||² = <Kc, Lc>``, ``||Xcᵀ Xc|| = ||Kc||``).

    The sums are taken in fp64 (products of fp32 values are exact there and cannot overflow;
    temporaries are ``p²``-sized), in a fixed number of ops per group of equal shapes, and
    combined by :func:`cka_from_stats` (the same degenerate rule). Returns ``ac``'s dtype."""
    a, b, c = ac.double(), bc.double(), cc.double()
    if ac.dtype == torch.float64:  # fp64 products: normalize first, or the sums leave the range
        ix, iy = _inv_scale(_trace(a)), _inv_scale(_trace(b))
        a, b = a * ix[..., None, None], b * iy[..., None, None]
        c = c * (torch.sqrt(ix) * torch.sqrt(iy))[..., None, None]
    st = torch.stack([_frob2(c), _frob2(a), _frob2(b), _trace(a), _trace(b)], -1)
    return cka_from_stats(st, ac.dtype).to(ac.dtype)


class _NuclearNorm(torch.autograd.Function):
    """``||Xcᵀ Yc||_* = tr((Lh Kc Lh)^{1/2})`` from centered Grams (``Lh = Lc^{1/2}``), by
    eigendecomposition in fp64, with a stable backward:
    ``dN/dKc = ½ Lh (Lh Kc Lh)^{+½} Lh`` (and symmetrically for ``Lc``), where ``^{+½}`` is the
    inverse square root on eigenvalues above a cutoff and 0 below it. That is the polar factor
    of ``Xcᵀ Yc`` pulled back to sample space: bounded at rank deficiency (centering always adds
    a zero eigenvalue), with no ``1/(λ_i - λ_j)`` terms.

    Accuracy: a Gram squares singular values, so eigenvalues below ``cut = n eps λ_max`` (eps of
    the Gram's dtype) are rounding noise and are dropped (their square roots would add
    ``O(sqrt(eps))`` each). Singular values of ``Xcᵀ Yc`` below ``sqrt(cut)`` times the largest
    do not count: 2.4e-7 for fp64 Grams at n = 256, but 5.5e-3 for fp32 Grams, which is why
    :func:`guidance_kernels.procrustes` always builds fp64 Grams.

    Non-finite Grams give NaN (not an eigh error), so AMP's loss scaler can skip the step.
    ``eigh`` checks convergence on the host: on CUDA the Procrustes metrics sync once per call
    (the CKA metrics never do). Not twice differentiable: ``create_graph=True`` raises."""

    @staticmethod
    def _eigh_cut(m, rel):
        w, v = torch.linalg.eigh((m + m.mT) / 2)
        keep = w > w.amax(-1, keepdim=True).clamp_min(0) * rel
        return torch.where(keep, w, torch.zeros_like(w)), v, keep

    @staticmethod
    def _root_and_grad(kc, lc, rel, need_grad):
        w, v, _ = _NuclearNorm._eigh_cut(lc, rel)
        lh = (v * w.sqrt()[..., None, :]) @ v.mT
        w, v, keep = _NuclearNorm._eigh_cut(lh @ kc @ lh, rel)
        nuc = w.sqrt().sum(-1)
        if not need_grad:
            return nuc, None
        inv = torch.where(keep, torch.rsqrt(torch.where(keep, w, torch.ones_like(w))), torch.zeros_like(w))
        return nuc, 0.5 * (lh @ (v * inv[..., None, :]) @ v.mT @ lh)

    @staticmethod
    def forward(ctx, kc, lc):
        ctx.rel = kc.shape[-1] * torch.finfo(kc.dtype).eps
        bad = ~(torch.isfinite(kc).all((-2, -1)) & torch.isfinite(lc).all((-2, -1)))
        k64 = torch.where(bad[..., None, None], 0.0, kc.double())
        l64 = torch.where(bad[..., None, None], 0.0, lc.double())
        ctx.save_for_backward(k64, l64)
        nuc = _NuclearNorm._root_and_grad(k64, l64, ctx.rel, False)[0]
        out = torch.where(bad, float("nan"), nuc)
        # no `.to` when the dtype already matches: under torch.compile, torch 2.11 (fixed by 2.14)
        # drops the gradient of an autograd.Function whose output is a no-op `.to` alias
        return out if out.dtype == kc.dtype else out.to(kc.dtype)

    @staticmethod
    def backward(ctx, g):
        k64, l64 = ctx.saved_tensors
        if torch.is_grad_enabled() and (k64.requires_grad or l64.requires_grad or g.requires_grad):
            raise RuntimeError(
                "the Procrustes metrics are not twice differentiable (create_graph=True through "
                "gk.procrustes / metric='procrustes'); use a CKA metric for higher-order gradients"
            )
        dk = dl = None
        g64 = g.double()[..., None, None]
        if ctx.needs_input_grad[0]:
            dk = (g64 * _NuclearNorm._root_and_grad(k64, l64, ctx.rel, True)[1]).to(g.dtype)
        if ctx.needs_input_grad[1]:
            dl = (g64 * _NuclearNorm._root_and_grad(l64, k64, ctx.rel, True)[1]).to(g.dtype)
        return dk, dl


def procrustes_from_grams(kc: Tensor, lc: Tensor, angular: bool = False) -> Tensor:
    """Orthogonal Procrustes distance between centered, Frobenius-normalized representations
    from centered Grams (..., n, n) -> (...,): the squared distance ``2 - 2 ||Xnᵀ Yn||_*`` in [0, 2],
    or with ``angular=True`` the angle ``arccos ||Xnᵀ Yn||_*`` in [0, π/2].

    The angle's derivative ``-1/sqrt(1 - c²)`` is unbounded at ``c = 1``: ``c`` is clamped to
    ``1 - 1e-6`` (fp32) / ``1 - 1e-12`` (fp64), so identical inputs give a zero gradient and
    near-identical ones a large but finite one."""
    kc, lc = normalize_gram(kc), normalize_gram(lc)
    nx2, ny2 = _trace(kc), _trace(lc)
    tol = tolerance(kc.dtype)
    deg = (nx2 <= tol) | (ny2 <= tol)
    nuc = _NuclearNorm.apply(kc, lc)
    den = torch.sqrt(torch.where(deg, torch.ones_like(nx2), nx2 * ny2))
    sim = torch.where(deg, torch.zeros_like(nuc), nuc / den)
    if angular:
        top = 1 - (1e-12 if sim.dtype == torch.float64 else 1e-6)
        return torch.arccos(sim.clamp(0.0, top))
    return 2 - 2 * sim.clamp(max=1.0)


def unit_centered_grams(k: Tensor, debiased: bool = False) -> Tensor:
    """(L, n, n) centered Grams -> (U-centered for ``debiased``) Grams of unit Frobenius norm,
    so that ``<u_i, u_j>`` is CKA; degenerate ones (see module doc) become all-zero."""
    k = normalize_gram(k)
    if debiased:
        kc, ref = u_center_gram(k), _frob2_off_diagonal(k)
    else:
        kc, ref = k, _frob2(k)
    a2 = _frob2(kc)
    deg = a2 <= tolerance(kc.dtype) ** 2 * ref
    scale = torch.where(deg, torch.zeros_like(a2), torch.rsqrt(torch.where(deg, torch.ones_like(a2), a2)))
    return kc * scale[:, None, None]
