"""The four heavy ops, registered with ``torch.library`` with fakes and autograd (the contract:
``docs/design.md``).

Each op takes a whole *group* of layers that share their shapes' sample count (and, for
``cross``, their feature sizes) and returns the group's results *stacked*, so that every step
after the backend's grouped launch (centering here, the CKA math in :mod:`..metrics`, and the
same in the backward) is a fixed number of batched ops per group, not a number per layer.
Callers group their layers with :func:`guidance_kernels.planning.group_by` (``functional``
does this). ``backend`` is a
name resolved beforehand by :func:`guidance_kernels.backends.resolve_backend`.

Backends compute products of the row-shifted activation ``x' = x - 1 x[0]`` (accurate when
deep layers share a large offset); the forward ops center those exactly, so their outputs do
not depend on the shift:

``gram(xs)``: ``xs[i]: (n, p_i)`` -> centered Grams ``H x xᵀ H`` stacked, ``(L, n, n)``.
Backward: ``dx = M' x'`` with ``M' = H (dK + dKᵀ) H`` (``= M' x`` since ``M' 1 = 0``).
``cross(xs, ys)``: ``xs[i]: (n, p)``, ``ys[i]: (n, q)`` -> centered ``Xcᵀ Xc (L, p, p)``,
``Ycᵀ Yc (L, q, q)``, ``Xcᵀ Yc (L, p, q)`` and column means ``μx (L, p)``, ``μy (L, q)`` (the
means in fp64, so that the backward recovers the means of ``x'`` without cancellation).
Backward: ``dx = x' m + y' dCᵀ + v`` with ``m = dA + dAᵀ``, ``v = dμx/n - μx'ᵀ m - μy'ᵀ dCᵀ``.

The backward ops (``gram_backward``: ``m[i] x'_i``; ``cross_backward``: ``x'_i m[i] + y'_i n[i]
+ v[i]``) are ops too, with autograd of their own, so double backward works. Every op body runs
with autocast off: products accumulate in fp32 (fp64 for fp64 input) whatever the caller's
context. Stacking the backend's per-layer outputs costs one Gram-sized copy per group (never an
activation-sized one).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from guidance_kernels.backends import get_backend
from guidance_kernels.metrics import center_gram, center_gram_
from guidance_kernels.planning import acc_dtype, no_autocast

__all__ = ["gram", "gram_backward", "cross", "cross_backward"]


def _no_autocast(tensors):
    return no_autocast(tensors[0].device if tensors else "cpu")


def _pick(items, mask):
    return [t for t, m in zip(items, mask) if m]


def _scatter(values, mask):
    it = iter(values)
    return [next(it) if m else None for m in mask]


def _rows(mask, like: Tensor) -> Tensor:
    """The stacked rows of ``like`` whose ``mask`` entry is set (no copy when all are; no
    host-to-device index either)."""
    if all(mask):
        return like
    return torch.stack([r for r, m in zip(like.unbind(0), mask) if m])


def _unshift_rows(g: Tensor) -> Tensor:
    """``Sᵀ g`` for the shift ``S = I - 1 e0ᵀ``: row 0 minus the column sums of ``g``."""
    return g - torch.nn.functional.pad(g.sum(0, keepdim=True), (0, 0, 0, g.shape[0] - 1))


def _one_acc(op: str, tensors: Sequence[Tensor]) -> torch.dtype:
    accs = {acc_dtype(t.dtype) for t in tensors}
    if len(accs) != 1:
        raise ValueError(f"guidance_kernels::{op}: one group mixes accumulation dtypes {sorted(map(str, accs))}")
    return accs.pop()


def _check_group(op: str, xs: Sequence[Tensor], name: str, same_features: bool) -> None:
    if len(xs) == 0:
        raise ValueError(f"guidance_kernels::{op}: empty list {name}")
    n, p = xs[0].shape[0], xs[0].shape[-1]
    for i, x in enumerate(xs):
        if x.dim() != 2 or x.shape[0] != n or (same_features and x.shape[1] != p):
            want = f"({n}, {p})" if same_features else f"({n}, p)"
            raise ValueError(f"guidance_kernels::{op}: {name}[{i}] has shape {tuple(x.shape)}; a group needs {want}")


def _check_stack(op: str, name: str, t: Tensor, want: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"guidance_kernels::{op}: {name} has shape {tuple(t.shape)}; expected {tuple(want)} ({what})")


def _check_gram_backward(m: Tensor, xs: Sequence[Tensor]) -> None:
    _check_group("gram_backward", xs, "xs", same_features=False)
    n = xs[0].shape[0]
    _check_stack("gram_backward", "m", m, (len(xs), n, n), f"one (n, n) matrix for each of the {len(xs)} xs")


def _check_cross_backward(xs, m, ys, nm, v) -> None:
    op = "cross_backward"
    _check_group(op, xs, "xs", same_features=True)
    _check_group(op, ys, "ys", same_features=True)
    L, n, p, q = len(xs), xs[0].shape[0], xs[0].shape[1], ys[0].shape[1]
    if len(ys) != L or ys[0].shape[0] != n:
        raise ValueError(f"guidance_kernels::{op}: {L} xs of {tuple(xs[0].shape)} vs {len(ys)} ys of {tuple(ys[0].shape)}")
    _check_stack(op, "m", m, (L, p, p), f"one (p, p) for each of the {L} xs")
    _check_stack(op, "nm", nm, (L, q, p), f"one (q, p) for each of the {L} pairs")
    _check_stack(op, "v", v, (L, p), f"one (p,) for each of the {L} xs")


# --------------------------------------------------------------------------- gram
@torch.library.custom_op("guidance_kernels::gram", mutates_args=())
def gram(xs: list[Tensor], backend: str) -> Tensor:
    """xs: L 2-D (n, p_i) float tensors (one n, one accumulation dtype) -> centered Grams
    H x xᵀ H stacked, (L, n, n), fp32 (fp64 for fp64 input)."""
    _check_group("gram", xs, "xs", same_features=False)
    _one_acc("gram", xs)
    with _no_autocast(xs):
        k = get_backend(backend).gram(list(xs))
        return center_gram_(k if isinstance(k, Tensor) else torch.stack(k))


@gram.register_fake
def _(xs, backend):
    _check_group("gram", xs, "xs", same_features=False)
    n = xs[0].shape[0]
    return xs[0].new_empty((len(xs), n, n), dtype=_one_acc("gram", xs))


@torch.library.custom_op("guidance_kernels::gram_backward", mutates_args=())
def gram_backward(m: Tensor, xs: list[Tensor], backend: str) -> list[Tensor]:
    """m: (L, n, n), xs: L (n, p_i) -> [m[i] @ (x_i - 1 x_i[0])], (n, p_i) in x_i's dtype."""
    _check_gram_backward(m, xs)
    with _no_autocast(xs):
        return get_backend(backend).gram_backward(list(m.unbind(0)), list(xs))


@gram_backward.register_fake
def _(m, xs, backend):
    _check_gram_backward(m, xs)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _gram_setup(ctx, inputs, output):
    xs, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(*xs)


def _gram_bwd(ctx, grad):
    xs = ctx.saved_tensors
    need = ctx.needs_input_grad[0]
    if not any(need):
        return [None] * len(xs), None
    g = _rows(need, grad)
    dxs = gram_backward(center_gram(g + g.mT), _pick(xs, need), ctx.backend)
    return _scatter(dxs, need), None


gram.register_autograd(_gram_bwd, setup_context=_gram_setup)


def _gram_backward_setup(ctx, inputs, output):
    m, xs, backend = inputs
    ctx.save_for_backward(m, *xs)


def _gram_backward_bwd(ctx, grads):
    m, *xs = ctx.saved_tensors
    need_m, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # out_i = m_i x'_i with x' = S x: dm_i = dout_i x'_iᵀ, dx_i = Sᵀ m_iᵀ dout_i (second order).
    acc = m.dtype
    dms, dxs = [], []
    for i, (g, x, nx) in enumerate(zip(grads, xs, need_x)):
        g = g.to(acc)
        xa = x.to(acc)
        dms.append(g @ (xa - xa[:1]).T if need_m else None)
        dxs.append(_unshift_rows(m[i].mT @ g).to(x.dtype) if nx else None)
    return (torch.stack(dms) if need_m else None), dxs, None


gram_backward.register_autograd(_gram_backward_bwd, setup_context=_gram_backward_setup)


# --------------------------------------------------------------------------- cross
@torch.library.custom_op("guidance_kernels::cross", mutates_args=())
def cross(xs: list[Tensor], ys: list[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Feature-space products of L pairs xs[i]: (n, p), ys[i]: (n, q) (one shape per side, one
    accumulation dtype) -> centered Xcᵀ Xc (L, p, p), Ycᵀ Yc (L, q, q), Xcᵀ Yc (L, p, q) in fp32
    (fp64 for fp64 input) and column means μx (L, p), μy (L, q) in fp64."""
    _check_cross(xs, ys)
    with _no_autocast(xs):
        a, b, c, sx, sy = (torch.stack(t) for t in get_backend(backend).cross(list(xs), list(ys)))
        n = xs[0].shape[0]
        mx, my = sx / n, sy / n  # column means of the shifted x', y'
        a = a - n * mx[:, :, None] * mx[:, None, :]
        b = b - n * my[:, :, None] * my[:, None, :]
        c = c - n * mx[:, :, None] * my[:, None, :]
        x0 = torch.stack([x[0] for x in xs]).double()
        y0 = torch.stack([y[0] for y in ys]).double()
        return a, b, c, mx.double() + x0, my.double() + y0


def _check_cross(xs, ys):
    _check_group("cross", xs, "xs", same_features=True)
    _check_group("cross", ys, "ys", same_features=True)
    if len(xs) != len(ys) or ys[0].shape[0] != xs[0].shape[0]:
        raise ValueError(
            f"guidance_kernels::cross: {len(xs)} xs of {tuple(xs[0].shape)} vs {len(ys)} ys of {tuple(ys[0].shape)}"
        )
    return _one_acc("cross", list(xs) + list(ys))


@cross.register_fake
def _(xs, ys, backend):
    acc = _check_cross(xs, ys)
    L, p, q = len(xs), xs[0].shape[1], ys[0].shape[1]
    e = xs[0].new_empty
    return (
        e((L, p, p), dtype=acc),
        e((L, q, q), dtype=acc),
        e((L, p, q), dtype=acc),
        e((L, p), dtype=torch.float64),
        e((L, q), dtype=torch.float64),
    )


@torch.library.custom_op("guidance_kernels::cross_backward", mutates_args=())
def cross_backward(
    xs: list[Tensor], m: Tensor, ys: list[Tensor], nm: Tensor, v: Tensor, backend: str
) -> list[Tensor]:
    """[x'_i @ m[i] + y'_i @ nm[i] + v[i]] with x' = x - 1 x[0], y' = y - 1 y[0]; xs[i]: (n, p),
    m: (L, p, p), ys[i]: (n, q), nm: (L, q, p), v: (L, p); in x_i's dtype."""
    _check_cross_backward(xs, m, ys, nm, v)
    with _no_autocast(xs):
        return get_backend(backend).cross_backward(
            list(xs), list(m.unbind(0)), list(ys), list(nm.unbind(0)), list(v.unbind(0))
        )


@cross_backward.register_fake
def _(xs, m, ys, nm, v, backend):
    _check_cross_backward(xs, m, ys, nm, v)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _cross_setup(ctx, inputs, output):
    xs, ys, backend = inputs
    ctx.backend = backend
    ctx.count = len(xs)
    ctx.save_for_backward(*xs, *ys, output[3], output[4])


def _cross_grad(xs, ys, mx, my, dself, dcross, dmean, backend):
    """Gradient for the ``xs`` side (stacked ``dself (L,p,p)``, ``dcross (L,q,p)``,
    ``dmean (L,p)``): ``x' m + y' nm + v`` (see module doc)."""
    m = dself + dself.mT
    x0 = torch.stack([x[0] for x in xs]).double()
    y0 = torch.stack([y[0] for y in ys]).double()
    sx = (mx - x0).to(m.dtype)  # means of x', y': exact to rounding (fp64 means)
    sy = (my - y0).to(m.dtype)
    n = xs[0].shape[0]
    v = dmean.to(m.dtype) / n - (sx[:, None, :] @ m)[:, 0] - (sy[:, None, :] @ dcross)[:, 0]
    return cross_backward(xs, m, ys, dcross, v, backend)


def _cross_bwd(ctx, da, db, dc, dmx, dmy):
    k = ctx.count
    saved = ctx.saved_tensors
    xs, ys, mx, my = saved[:k], saved[k : 2 * k], saved[2 * k], saved[2 * k + 1]
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dxs = dys = []
    if any(need_x):
        p, r = (lambda t: _pick(t, need_x)), (lambda t: _rows(need_x, t))  # noqa: E731
        dxs = _cross_grad(p(xs), p(ys), r(mx), r(my), r(da), r(dc).mT, r(dmx), ctx.backend)
    if any(need_y):
        p, r = (lambda t: _pick(t, need_y)), (lambda t: _rows(need_y, t))  # noqa: E731
        dys = _cross_grad(p(ys), p(xs), r(my), r(mx), r(db), r(dc), r(dmy), ctx.backend)
    return _scatter(dxs, need_x), _scatter(dys, need_y), None


cross.register_autograd(_cross_bwd, setup_context=_cross_setup)


def _cross_backward_setup(ctx, inputs, output):
    xs, m, ys, nm, v, backend = inputs
    ctx.count = len(xs)
    ctx.save_for_backward(m, nm, *xs, *ys)


def _cross_backward_bwd(ctx, grads):
    k = ctx.count
    m, nm, *rest = ctx.saved_tensors
    xs, ys = rest[:k], rest[k:]
    need = ctx.needs_input_grad
    dxs, dms, dys, dns, dvs = [], [], [], [], []
    # out = x' m + y' nm + v: dx = Sᵀ g mᵀ, dm = x'ᵀ g, dy = Sᵀ g nmᵀ, dnm = y'ᵀ g, dv = Σ_rows g.
    for i, (g, x, y) in enumerate(zip(grads, xs, ys)):
        acc = m.dtype
        g = g.to(acc)
        xa, ya = x.to(acc), y.to(acc)
        dxs.append(_unshift_rows(g @ m[i].mT).to(x.dtype) if need[0][i] else None)
        dms.append((xa - xa[:1]).mT @ g)
        dys.append(_unshift_rows(g @ nm[i].mT).to(y.dtype) if need[2][i] else None)
        dns.append((ya - ya[:1]).mT @ g)
        dvs.append(g.sum(0))
    st = lambda ts, flag: torch.stack(ts) if flag else None  # noqa: E731
    return dxs, st(dms, need[1]), dys, st(dns, need[3]), st(dvs, need[4]), None


cross_backward.register_autograd(_cross_backward_bwd, setup_context=_cross_backward_setup)
