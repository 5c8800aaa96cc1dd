"""Public functional API. All tensors are representations ``(n, ...)`` with samples in dim 0,
flattened per sample; any float dtype (fp16/bf16 accumulate in fp32, results fp32; fp64 stays
fp64). Heavy products run through the ``torch.library`` ops in :mod:`guidance_kernels.ops`
(one call for all layers); the small math is :mod:`guidance_kernels.metrics`.

``backend``: ``"auto"`` (fastest available for the device), ``"reference"`` (plain PyTorch),
``"triton"``, ``"cuda"``. ``form``: ``"auto"`` picks sample space (``n x n`` Grams) or feature
space (``p x q`` cross-covariances) per pair by cost; CKA and debiased CKA have both forms
(debiased CKA in feature space: :mod:`guidance_kernels.feature_debiased`, no ``n x n``
Gram), Procrustes always uses sample space.

Numerics (rules, documented in :mod:`.metrics`, :mod:`._scaling`, :mod:`._memory`): a pair with
one fp64 side is computed in fp64 on both sides (either form); every input is rescaled by an
on-device power of two when ``max|x|`` is outside ``[2^-16, 2^16)`` (exact, no host sync);
the ``n x n`` / ``p x q`` temporaries a call needs are estimated from shapes first, and a call
over the budget (``GUIDANCE_KERNELS_MAX_BYTES``, default the device's memory) raises a
``ValueError`` naming the pair.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from guidance_kernels import _checks, _memory, _scaling, metrics, ops
from guidance_kernels.feature_debiased import debiased_cka_features
from guidance_kernels.backends import cpu_gram, resolve_backend
from guidance_kernels.planning import (
    acc_dtype,
    assemble,
    choose_form,
    group_by,
    no_autocast,
    promoted_dtype,
    score_dtype,
    shape_class,
    unique,
)

Metric = Literal["cka", "debiased_cka", "procrustes", "angular_procrustes"]
METRICS = ("cka", "debiased_cka", "procrustes", "angular_procrustes")
_SIMILARITIES = ("cka", "debiased_cka")
_FEATURE_METRICS = ("cka", "debiased_cka")

__all__ = [
    "cka",
    "procrustes",
    "pair_scores",
    "guidance_loss",
    "centered_gram",
    "cka_matrix",
    "choose_form",
]


def _gram_tables(xs: list[Tensor], backend: str):
    """Centered Grams of the distinct tensors of ``xs``: one ``ops.gram`` call per group of
    equal ``n`` and accumulation dtype. Returns ``(tables, where)``: ``tables[key]`` is a
    ``(L_key, n, n)`` stack and ``where[i] = (key, row)`` locates the Gram of ``xs[i]``."""
    uniq, index = unique(xs)
    tables: dict = {}
    pos: list = [None] * len(uniq)
    for key, idx in group_by(uniq, lambda t: (t.shape[0], acc_dtype(t.dtype))).items():
        tables[key] = ops.gram([uniq[i] for i in idx], backend)
        for row, i in enumerate(idx):
            pos[i] = (key, row)
    return tables, [pos[j] for j in index]


def _take(tables: dict, where: list, idx: Sequence[int]) -> Tensor:
    """The Grams of inputs ``idx`` stacked, ``(len(idx), n, n)``: a slice of one table when they
    are consecutive rows of it (no copy), else one stacking copy (promoted to a common dtype)."""
    keys = {where[i][0] for i in idx}
    rows = [where[i][1] for i in idx]
    if len(keys) == 1:
        table = tables[next(iter(keys))]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return table[rows[0] : rows[0] + len(rows)]
        return torch.stack([table[r] for r in rows])
    dtype = promoted_dtype(k[1] for k in keys)
    return torch.stack([tables[where[i][0]][where[i][1]].to(dtype) for i in idx])


def stacked_grams(xs: list[Tensor], backend: str) -> Tensor:
    """Centered Grams of ``xs`` (one ``n``), ``(L, n, n)``, each distinct tensor computed once."""
    tables, where = _gram_tables(xs, backend)
    return _take(tables, where, range(len(xs)))


def _sample_scores(xs, ys, metric, backend) -> list[tuple[list[int], Tensor]]:
    if metric not in _SIMILARITIES:
        # The nuclear norm comes from eigenvalues of Grams, which square singular values: fp32
        # Grams would lose every singular value below ~5e-3 of the largest (see metrics).
        xs, ys = [x.double() for x in xs], [y.double() for y in ys]
    tables, where = _gram_tables(xs + ys, backend)
    L = len(xs)
    parts = []
    # the small math, batched per n and Gram dtypes (an fp32 pair keeps fp32's degenerate rules
    # whatever else is in the call)
    key = lambda i: (xs[i].shape[0], where[i][0][1], where[L + i][0][1])  # noqa: E731
    for idx in group_by(range(L), key).values():
        k = _take(tables, where, idx)
        l = _take(tables, where, [L + i for i in idx])
        if k.dtype != l.dtype:
            k, l = k.double(), l.double()
        if metric == "cka":  # one fused statistics call for the group
            k, l = metrics.stats_ready(k, l)
            st = ops.gram_stats(k.contiguous(), l.contiguous(), backend)
            s = metrics.cka_from_stats(st, k.dtype)
        elif metric == "debiased_cka":
            s = metrics.cka_from_grams(k, l, debiased=True)
        else:
            s = metrics.procrustes_from_grams(k, l, angular=metric == "angular_procrustes")
        parts.append((idx, s))
    return parts


def _cast_pairs(xs: list[Tensor], ys: list[Tensor], rule) -> tuple[list[Tensor], list[Tensor]]:
    """Each pair cast to ``rule(x, y)`` (a dtype, or ``None`` to keep it as it is), one copy per
    distinct (tensor, dtype): a tensor shared by several pairs stays one tensor, so its Gram is
    still computed once."""
    copies: dict = {}

    def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
        key = (id(t), dtype)
        if key not in copies:
            copies[key] = t.to(dtype)
        return copies[key]

    out_x, out_y = [], []
    for x, y in zip(xs, ys):
        dtype = rule(x, y)
        out_x.append(x if dtype is None else cast(x, dtype))
        out_y.append(y if dtype is None else cast(y, dtype))
    return out_x, out_y


def _same_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    """Both to the common dtype (one copy of the lower-precision tensor when they differ)."""
    return torch.promote_types(x.dtype, y.dtype)


def _promote_pair(x: Tensor, y: Tensor) -> Optional[torch.dtype]:
    """A pair whose accumulation dtypes differ (one side fp64) as fp64 on both sides; others as
    they are (a bf16 / fp32 pair both accumulate in fp32)."""
    return None if acc_dtype(x.dtype) == acc_dtype(y.dtype) else torch.float64


def _feature_scores(xs, ys, backend, metric="cka") -> list[tuple[list[int], Tensor]]:
    if metric == "debiased_cka":  # per pair, row blocks (plain PyTorch on any device)
        return [([i], debiased_cka_features(x, y)[None]) for i, (x, y) in enumerate(zip(xs, ys))]
    parts = []
    key = lambda i: (tuple(xs[i].shape), tuple(ys[i].shape), acc_dtype(xs[i].dtype), acc_dtype(ys[i].dtype))  # noqa: E731
    for idx in group_by(range(len(xs)), key).values():
        a, b, c, _, _ = ops.cross([xs[i] for i in idx], [ys[i] for i in idx], backend)
        parts.append((idx, metrics.cka_from_cross(a, b, c)))
    return parts


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
    if form == "feature" and metric not in _FEATURE_METRICS:
        raise ValueError(f"form='feature' supports metrics 'cka' and 'debiased_cka' only, not {metric!r}")
    xs, ys = _checks.check_pairs(targets, guides, min_n=4 if metric == "debiased_cka" else 2)
    # one rule for mixed pairs: a pair whose sides accumulate in different dtypes (one side
    # fp64) is computed in fp64, both sides (one fp64 copy of the narrower side), under fp64's
    # degenerate rule; it may then use either form
    xs, ys = _cast_pairs(xs, ys, _promote_pair)
    name = resolve_backend(backend, xs + ys, shape_class(xs, ys) if backend == "auto" else None)
    if form == "auto":
        forms = [
            choose_form(x.shape[0], x.shape[1], y.shape[1])
            if metric == "cka" or (metric in _FEATURE_METRICS and x.dtype == y.dtype)
            else "sample"
            for x, y in zip(xs, ys)
        ]
    else:
        forms = [form] * len(xs)
        if form == "feature":  # the cross products need one dtype per pair
            xs, ys = _cast_pairs(xs, ys, _same_dtype)
    _memory.check_pairs(xs, ys, forms, metric)
    sample = [i for i, f in enumerate(forms) if f == "sample"]
    feature = [i for i, f in enumerate(forms) if f == "feature"]
    dtype = score_dtype(xs + ys)

    def scores(xs, ys):
        parts: list[tuple[list[int], Tensor]] = []
        if sample:
            got = _sample_scores([xs[i] for i in sample], [ys[i] for i in sample], metric, name)
            parts += [([sample[j] for j in idx], s.to(dtype)) for idx, s in got]
        if feature:
            got = _feature_scores([xs[i] for i in feature], [ys[i] for i in feature], name, metric)
            parts += [([feature[j] for j in idx], s.to(dtype)) for idx, s in got]
        return assemble(parts, len(xs))

    with no_autocast(xs[0].device):
        if not feature and metric in _SIMILARITIES:
            got = _unscaled_cpu(xs + ys, name, lambda: scores(xs, ys))
            if got is not None:
                return got
        scaled = _scaling.rescale_all(xs + ys)  # extreme magnitudes: see _scaling
        return scores(scaled[: len(xs)], scaled[len(xs) :])


def _unscaled_cpu(members: list[Tensor], backend: str, compute):
    """The CPU fast path of the scale check (:mod:`._scaling`): when every member goes to the
    fused Gram kernel, ``compute()`` runs on the unscaled members while the kernel reads their
    min / max, and its result is returned when every scale factor is 1: then it is exactly what
    the :func:`_scaling.rescale_all` path computes (that path leaves such tensors unchanged),
    without that path's extra read of every member. Otherwise (extreme magnitudes, or a member
    the kernel did not see) ``None``: the caller recomputes through ``rescale_all``."""
    if backend != "reference" or torch.compiler.is_compiling() or not all(map(cpu_gram.gram_available, members)):
        return None
    with cpu_gram.recording_ranges() as seen:
        out = compute()
    ranges = [seen.get(cpu_gram.key(m)) for m in members]
    if any(r is None for r in ranges) or not _scaling.all_unscaled(ranges, torch.float32):
        return None
    return out


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
    _memory.check_grams([x2], "centered_gram(x)")
    with no_autocast(x2.device):
        return ops.gram([x2], resolve_backend(backend, [x2]))[0]


def _as_double(ts: list[Tensor]) -> list[Tensor]:
    """fp64 versions of ``ts``, one copy per distinct tensor (identity kept for repeats)."""
    uniq, index = unique(ts)
    d = [t.double() for t in uniq]
    return [d[i] for i in index]


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
    dtype = score_dtype(xs2 + ys2)
    if dtype == torch.float64:  # mixed members: all in fp64, under fp64's rule (as pair_scores)
        xs2 = _as_double(xs2)
        ys2 = xs2 if ys is None else _as_double(ys2)
    members = xs2 + ys2 if ys is not None else xs2
    _memory.check_grams(members, "cka_matrix", per_pair=6 if debiased else 3, pairs=len(members))
    name = resolve_backend(backend, xs2 + ys2)

    def matrix(members):
        units = metrics.unit_centered_grams(stacked_grams(members, name).to(dtype), debiased)
        u, v = units[: len(xs2)], units[len(xs2) :]
        return u.flatten(1) @ v.flatten(1).T

    with no_autocast(xs2[0].device):
        got = _unscaled_cpu(xs2 + ys2, name, lambda: matrix(xs2 + ys2))
        return got if got is not None else matrix(_scaling.rescale_all(xs2 + ys2))
