"""The four heavy ops, registered with ``torch.library`` with fakes and autograd.

Each op takes a whole list of layers (one call, as few launches as the backend can manage) and
a ``backend`` name (resolved beforehand by :func:`guidance_kernels.backends.resolve_backend`).
Backends compute products of the row-shifted activation ``x' = x - 1 x[0]`` (accurate when
deep layers share a large offset); the forward ops center those exactly, so their outputs do
not depend on the shift:

``gram(xs)``: centered Grams ``[H x xᵀ H]``, ``(n, n)``. Backward:
``dx = M' x'`` with ``M' = H (dK + dKᵀ) H`` (``= M' x`` since ``M' 1 = 0``).
``cross(xs, ys)``: centered ``[Xcᵀ Xc], [Ycᵀ Yc], [Xcᵀ Yc]`` and column means ``[μx], [μy]``
(the means in fp64, so that the backward recovers the means of ``x'`` without cancellation).
Backward: ``dx = x' m + y' dCᵀ + v`` with ``m = dA + dAᵀ``, ``v = dμx/n - μx'ᵀ m - μy'ᵀ dCᵀ``.

The backward ops (``gram_backward``: ``m x'``; ``cross_backward``: ``x' m + y' n + v``) are ops
too, with autograd of their own, so double backward works. Every op body runs with autocast
off: products accumulate in fp32 (fp64 for fp64 input) whatever the caller's context.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from guidance_kernels.backends import get_backend
from guidance_kernels.backends.reference import acc_dtype
from guidance_kernels.metrics import center_gram


def _no_autocast(tensors):
    device_type = tensors[0].device.type if tensors else "cpu"
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _pick(items, mask):
    return [t for t, m in zip(items, mask) if m]


def _scatter(values, mask):
    it = iter(values)
    return [next(it) if m else None for m in mask]


def _unshift_rows(g: Tensor) -> Tensor:
    """``Sᵀ g`` for the shift ``S = I - 1 e0ᵀ``: row 0 minus the column sums of ``g``."""
    return g - torch.nn.functional.pad(g.sum(0, keepdim=True), (0, 0, 0, g.shape[0] - 1))


# --------------------------------------------------------------------------- gram
@torch.library.custom_op("guidance_kernels::gram", mutates_args=())
def gram(xs: list[Tensor], backend: str) -> list[Tensor]:
    """xs: 2-D (n_i, p_i) float tensors -> centered Grams H x xᵀ H, (n_i, n_i), fp32 (fp64)."""
    with _no_autocast(xs):
        return [center_gram(k) for k in get_backend(backend).gram(list(xs))]


@gram.register_fake
def _(xs, backend):
    return [x.new_empty((x.shape[0], x.shape[0]), dtype=acc_dtype(x.dtype)) for x in xs]


@torch.library.custom_op("guidance_kernels::gram_backward", mutates_args=())
def gram_backward(ms: list[Tensor], xs: list[Tensor], backend: str) -> list[Tensor]:
    """ms: (n_i, n_i), xs: (n_i, p_i) -> [m @ (x - 1 x[0])] as (n_i, p_i) in x's dtype."""
    with _no_autocast(xs):
        return get_backend(backend).gram_backward(list(ms), list(xs))


@gram_backward.register_fake
def _(ms, xs, backend):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _gram_setup(ctx, inputs, output):
    xs, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(*xs)


def _gram_bwd(ctx, grads):
    xs = ctx.saved_tensors
    need = ctx.needs_input_grad[0]
    ms = [center_gram(g + g.mT) for g, n in zip(grads, need) if n]
    dxs = gram_backward(ms, _pick(xs, need), ctx.backend) if ms else []
    return _scatter(dxs, need), None


gram.register_autograd(_gram_bwd, setup_context=_gram_setup)


def _gram_backward_setup(ctx, inputs, output):
    ms, xs, backend = inputs
    ctx.save_for_backward(*ms, *xs)
    ctx.count = len(xs)


def _gram_backward_bwd(ctx, grads):
    saved = ctx.saved_tensors
    ms, xs = saved[: ctx.count], saved[ctx.count :]
    need_m, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # out = m x' with x' = S x: dm = dout x'ᵀ, dx = Sᵀ mᵀ dout (second-order terms; plain torch).
    dms, dxs = [], []
    for g, m, x, nm, nx in zip(grads, ms, xs, need_m, need_x):
        acc = m.dtype
        g = g.to(acc)
        xa = x.to(acc)
        dms.append(g @ (xa - xa[:1]).T if nm else None)
        dxs.append(_unshift_rows(m.mT @ g).to(x.dtype) if nx else None)
    return dms, dxs, None


gram_backward.register_autograd(_gram_backward_bwd, setup_context=_gram_backward_setup)


# --------------------------------------------------------------------------- cross
@torch.library.custom_op("guidance_kernels::cross", mutates_args=())
def cross(
    xs: list[Tensor], ys: list[Tensor], backend: str
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Feature-space products of pairs xs[i]: (n, p), ys[i]: (n, q) (one dtype per pair) ->
    centered ([Xcᵀ Xc] (p,p), [Ycᵀ Yc] (q,q), [Xcᵀ Yc] (p,q)) in fp32 (fp64 for fp64 input)
    and column means ([μx] (p,), [μy] (q,)) in fp64."""
    with _no_autocast(xs):
        aa, bb, cc, sx, sy = get_backend(backend).cross(list(xs), list(ys))
        out = ([], [], [], [], [])
        for a, b, c, su, sv, x, y in zip(aa, bb, cc, sx, sy, xs, ys):
            n = x.shape[0]
            mx, my = su / n, sv / n  # column means of the shifted x', y'
            out[0].append(a - n * torch.outer(mx, mx))
            out[1].append(b - n * torch.outer(my, my))
            out[2].append(c - n * torch.outer(mx, my))
            out[3].append(mx.double() + x[0].double())
            out[4].append(my.double() + y[0].double())
        return out


@cross.register_fake
def _(xs, ys, backend):
    def e(t, *shape):
        return t.new_empty(shape, dtype=acc_dtype(t.dtype))

    return (
        [e(x, x.shape[1], x.shape[1]) for x in xs],
        [e(y, y.shape[1], y.shape[1]) for y in ys],
        [e(x, x.shape[1], y.shape[1]) for x, y in zip(xs, ys)],
        [x.new_empty((x.shape[1],), dtype=torch.float64) for x in xs],
        [y.new_empty((y.shape[1],), dtype=torch.float64) for y in ys],
    )


@torch.library.custom_op("guidance_kernels::cross_backward", mutates_args=())
def cross_backward(
    xs: list[Tensor], ms: list[Tensor], ys: list[Tensor], ns: list[Tensor], vs: list[Tensor], backend: str
) -> list[Tensor]:
    """[x' @ m + y' @ n + v] with x' = x - 1 x[0], y' = y - 1 y[0]; x: (n, p), m: (p, p),
    y: (n, q), n: (q, p), v: (p,); x's dtype."""
    with _no_autocast(xs):
        return get_backend(backend).cross_backward(list(xs), list(ms), list(ys), list(ns), list(vs))


@cross_backward.register_fake
def _(xs, ms, ys, ns, vs, backend):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _cross_setup(ctx, inputs, output):
    xs, ys, backend = inputs
    ctx.backend = backend
    ctx.count = len(xs)
    ctx.save_for_backward(*xs, *ys, *output[3], *output[4])


def _cross_grad(xs, ys, mxs, mys, dself, dcross, dmean, backend):
    """Gradient for the ``xs`` side: ``x' m + y' nm + v`` (see module doc)."""
    ms, nms, vs = [], [], []
    for x, y, mx, my, da, dc, dm in zip(xs, ys, mxs, mys, dself, dcross, dmean):
        m, nm = da + da.mT, dc
        sx = (mx - x[0].double()).to(m.dtype)  # mean of x', exact to rounding (fp64 mean)
        sy = (my - y[0].double()).to(m.dtype)
        ms.append(m)
        nms.append(nm)
        vs.append(dm.to(m.dtype) / x.shape[0] - sx @ m - sy @ nm)
    return cross_backward(xs, ms, ys, nms, vs, backend)


def _cross_bwd(ctx, da, db, dc, dmx, dmy):
    k = ctx.count
    saved = ctx.saved_tensors
    xs, ys, mxs, mys = saved[:k], saved[k : 2 * k], saved[2 * k : 3 * k], saved[3 * k :]
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dxs = dys = []
    if any(need_x):
        p = lambda t: _pick(t, need_x)  # noqa: E731
        dxs = _cross_grad(p(xs), p(ys), p(mxs), p(mys), p(da), [c.mT for c in p(dc)], p(dmx), ctx.backend)
    if any(need_y):
        p = lambda t: _pick(t, need_y)  # noqa: E731
        dys = _cross_grad(p(ys), p(xs), p(mys), p(mxs), p(db), p(dc), p(dmy), ctx.backend)
    return _scatter(dxs, need_x), _scatter(dys, need_y), None


cross.register_autograd(_cross_bwd, setup_context=_cross_setup)


def _cross_backward_setup(ctx, inputs, output):
    xs, ms, ys, ns, vs, backend = inputs
    ctx.count = len(xs)
    ctx.save_for_backward(*xs, *ms, *ys, *ns)


def _cross_backward_bwd(ctx, grads):
    k = ctx.count
    saved = ctx.saved_tensors
    xs, ms, ys, ns = saved[:k], saved[k : 2 * k], saved[2 * k : 3 * k], saved[3 * k :]
    need = ctx.needs_input_grad
    out = [[], [], [], [], []]
    # out = x' m + y' n + v: dx = Sᵀ g mᵀ, dm = x'ᵀ g, dy = Sᵀ g nᵀ, dn = y'ᵀ g, dv = Σ_rows g.
    for i, (g, x, m, y, n) in enumerate(zip(grads, xs, ms, ys, ns)):
        acc = m.dtype
        g = g.to(acc)
        xa, ya = x.to(acc), y.to(acc)
        out[0].append(_unshift_rows(g @ m.mT).to(x.dtype) if need[0][i] else None)
        out[1].append((xa - xa[:1]).mT @ g if need[1][i] else None)
        out[2].append(_unshift_rows(g @ n.mT).to(y.dtype) if need[2][i] else None)
        out[3].append((ya - ya[:1]).mT @ g if need[3][i] else None)
        out[4].append(g.sum(0) if need[4][i] else None)
    return (*out, None)


cross_backward.register_autograd(_cross_backward_bwd, setup_context=_cross_backward_setup)
