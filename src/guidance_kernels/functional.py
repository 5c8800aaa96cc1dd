"""Public functional API. All tensors are representations ``(n, ...)`` with samples in dim 0,
flattened per sample; any float dtype (fp16/bf16 accumulate in fp32, results fp32; fp64 stays
fp64). Heavy products run through the ``torch.library`` ops in :mod:`guidance_kernels.ops`
(one call for all layers); the small math is :mod:`guidance_kernels.metrics`.

``backend``: ``"auto"`` (fastest available for the device), ``"reference"`` (plain PyTorch),
``"triton"``, ``"cuda"``. ``form``: ``"auto"`` picks sample space (``n x n`` Grams) or feature
space (``p x q`` cross-covariances) per pair by cost; debiased CKA and Procrustes always use
sample space.
"""

from __future__ import annotations

import contextlib
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from guidance_kernels import _checks, metrics, ops
from guidance_kernels.backends import resolve_backend

Metric = Literal["cka", "debiased_cka", "procrustes", "angular_procrustes"]
METRICS = ("cka", "debiased_cka", "procrustes", "angular_procrustes")
_SIMILARITIES = ("cka", "debiased_cka")

__all__ = [
    "cka",
    "procrustes",
    "pair_scores",
    "guidance_loss",
    "centered_gram",
    "cka_matrix",
    "choose_form",
]


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _score_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def choose_form(n: int, p: int, q: int) -> str:
    """``"feature"`` when ``n (p + q) > p² + pq + q²`` (GUIDE §2 cost model), else ``"sample"``."""
    return "feature" if n * (p + q) > p * p + p * q + q * q else "sample"


def _unique(tensors: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Distinct tensors (by identity) and, for each input, its index among them."""
    uniq: list[Tensor] = []
    index = []
    for t in tensors:
        for j, u in enumerate(uniq):
            if u is t:
                index.append(j)
                break
        else:
            index.append(len(uniq))
            uniq.append(t)
    return uniq, index


def _grams(xs: list[Tensor], backend: str) -> list[Tensor]:
    """Centered Grams of ``xs``, each distinct tensor computed once, in one op call."""
    uniq, index = _unique(xs)
    grams = ops.gram(uniq, backend)
    return [grams[j] for j in index]


def _sample_scores(xs, ys, metric, backend) -> list[Tensor]:
    if metric not in _SIMILARITIES:
        # The nuclear norm comes from eigenvalues of Grams, which square singular values: fp32
        # Grams would lose every singular value below ~5e-3 of the largest (see metrics).
        xs, ys = [x.double() for x in xs], [y.double() for y in ys]
    grams = _grams(xs + ys, backend)
    ks, ls = grams[: len(xs)], grams[len(xs) :]
    out: list[Optional[Tensor]] = [None] * len(xs)
    groups: dict = {}
    for i, (k, l) in enumerate(zip(ks, ls)):  # batch the small math over pairs of equal n, dtype
        groups.setdefault((k.shape[0], k.dtype, l.dtype), []).append(i)
    for idx in groups.values():
        k = torch.stack([ks[i] for i in idx])
        l = torch.stack([ls[i] for i in idx])
        if k.dtype != l.dtype:
            k, l = k.double(), l.double()
        if metric in _SIMILARITIES:
            s = metrics.cka_from_grams(k, l, debiased=metric == "debiased_cka")
        else:
            s = metrics.procrustes_from_grams(k, l, angular=metric == "angular_procrustes")
        for j, i in enumerate(idx):
            out[i] = s[j]
    return out


def _promote_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Both to the common dtype (one copy of the lower-precision tensor when they differ)."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def _feature_scores(xs, ys, backend) -> list[Tensor]:
    a, b, c, _, _ = ops.cross(xs, ys, backend)
    return [metrics.cka_from_cross(*t) for t in zip(a, b, c)]


def pair_scores(
    targets: Sequence[Tensor],
    guides: Sequence[Tensor],
    *,
    metric: Metric = "cka",
    backend: str = "auto",
    form: Literal["auto", "sample", "feature"] = "auto",
) -> Tensor:
    """Per-pair score, shape ``(L,)``: CKA / debiased CKA (similarities) or the Procrustes
    distance (squared, or the angle for ``"angular_procrustes"``). fp32 (fp64 if any input is)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if form not in ("auto", "sample", "feature"):
        raise ValueError(f"unknown form {form!r}; choose 'auto', 'sample' or 'feature'")
    if form == "feature" and metric != "cka":
        raise ValueError(f"form='feature' supports metric 'cka' only, not {metric!r}")
    xs, ys = _checks.check_pairs(targets, guides, min_n=4 if metric == "debiased_cka" else 2)
    name = resolve_backend(backend, xs + ys)
    if form == "auto":
        forms = [
            choose_form(x.shape[0], x.shape[1], y.shape[1])
            if metric == "cka" and x.dtype == y.dtype
            else "sample"
            for x, y in zip(xs, ys)
        ]
    else:
        forms = [form] * len(xs)
        if form == "feature":  # the cross products need one dtype per pair
            xs, ys = map(list, zip(*(_promote_pair(x, y) for x, y in zip(xs, ys))))
    sample = [i for i, f in enumerate(forms) if f == "sample"]
    feature = [i for i, f in enumerate(forms) if f == "feature"]
    dtype = _score_dtype(xs + ys)
    scores: list[Optional[Tensor]] = [None] * len(xs)
    with _no_autocast(xs[0].device):
        if sample:
            got = _sample_scores([xs[i] for i in sample], [ys[i] for i in sample], metric, name)
            for i, s in zip(sample, got):
                scores[i] = s
        if feature:
            got = _feature_scores([xs[i] for i in feature], [ys[i] for i in feature], name)
            for i, s in zip(feature, got):
                scores[i] = s
        return torch.stack([s.to(dtype) for s in scores])


def guidance_loss(
    targets: Sequence[Tensor],
    guides: Sequence[Tensor],
    *,
    metric: Metric = "cka",
    weights: Optional[Sequence[float] | Tensor] = None,
    reduction: Literal["sum", "mean", "none"] = "sum",
    backend: str = "auto",
    form: Literal["auto", "sample", "feature"] = "auto",
) -> Tensor:
    """Representational-alignment loss over layer pairs ``(targets[l], guides[l])``:
    ``Σ_l w_l (1 - CKA_l)`` for ``"cka"`` / ``"debiased_cka"``, ``Σ_l w_l d_l`` for the
    Procrustes metrics. ``reduction="mean"`` divides by the number of pairs; ``"none"`` returns
    the ``(L,)`` weighted per-pair terms. Returns fp32 (fp64 if any input is fp64), also under
    autocast. Gradients flow to every input that requires grad (guides usually do not)."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'sum', 'mean' or 'none'")
    scores = pair_scores(targets, guides, metric=metric, backend=backend, form=form)
    terms = 1 - scores if metric in _SIMILARITIES else scores
    w = _checks.check_weights(weights, terms.shape[0], terms)
    if w is not None:
        terms = terms * w
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.mean()


def cka(x: Tensor, y: Tensor, *, debiased: bool = False, backend: str = "auto") -> Tensor:
    """Linear CKA of ``x`` (n, ...) and ``y`` (n, ...) -> 0-dim tensor; differentiable in both.
    Biased CKA lies in [0, 1]; the debiased estimator (n >= 4) in [-1, 1]."""
    return pair_scores([x], [y], metric="debiased_cka" if debiased else "cka", backend=backend)[0]


def procrustes(x: Tensor, y: Tensor, *, angular: bool = False, backend: str = "auto") -> Tensor:
    """Orthogonal Procrustes distance of centered, Frobenius-normalized ``x`` and ``y``:
    ``2 - 2 ||Xnᵀ Yn||_*`` in [0, 2], or ``arccos ||Xnᵀ Yn||_*`` with ``angular=True``.
    Computed from fp64 Grams (one fp64 copy of each input: a Gram squares singular values, so
    fp32 would lose the small ones) and returned in fp32 (fp64 for fp64 input)."""
    metric = "angular_procrustes" if angular else "procrustes"
    return pair_scores([x], [y], metric=metric, backend=backend)[0]


def centered_gram(x: Tensor, *, backend: str = "auto") -> Tensor:
    """``H X Xᵀ H`` for ``x`` (n, ...) -> (n, n), fp32 (fp64 for fp64 input)."""
    (x2,) = _checks.check_list([x], "x")
    with _no_autocast(x2.device):
        return ops.gram([x2], resolve_backend(backend, [x2]))[0]


def cka_matrix(
    xs: Sequence[Tensor],
    ys: Optional[Sequence[Tensor]] = None,
    *,
    debiased: bool = False,
    backend: str = "auto",
) -> Tensor:
    """CKA of every ``xs[i]`` against every ``ys[j]`` -> ``(len(xs), len(ys))``; ``ys=None``
    compares ``xs`` with itself. Each Gram is computed once, all in one op call, and all pairs
    come from one matrix product of the stacked, normalized centered Grams."""
    min_n = 4 if debiased else 2
    xs2 = _checks.check_list(xs, "xs", min_n=min_n)
    ys2 = xs2 if ys is None else _checks.check_list(ys, "ys", min_n=min_n)
    if ys2[0].shape[0] != xs2[0].shape[0]:
        raise ValueError(f"xs have n = {xs2[0].shape[0]} samples but ys have n = {ys2[0].shape[0]}")
    if ys2[0].device != xs2[0].device:
        raise ValueError(f"xs are on {xs2[0].device} but ys are on {ys2[0].device}")
    dtype = _score_dtype(xs2 + ys2)
    with _no_autocast(xs2[0].device):
        grams = _grams(xs2 + ys2, resolve_backend(backend, xs2 + ys2))
        units = metrics.unit_centered_grams(torch.stack([g.to(dtype) for g in grams]), debiased)
        u, v = units[: len(xs2)], units[len(xs2) :]
        return u.flatten(1) @ v.flatten(1).T
