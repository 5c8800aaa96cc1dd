"""The four heavy ops, registered with ``torch.library`` with fakes and autograd.

Each op takes a whole list of layers (one call, as few launches as the backend can manage) and
a ``backend`` name (resolved beforehand by :func:`guidance_kernels.backends.resolve_backend`).

``gram(xs)``: ``[x @ x.T]``, ``(n, n)`` in the accumulation dtype. Backward: ``dx = (dK + dKᵀ) x``.
``cross(xs, ys)``: ``[xᵀx], [yᵀy], [xᵀy], [Σ_rows x], [Σ_rows y]``. Backward:
``dx = x (dA + dAᵀ) + y dCᵀ + 1 dsxᵀ`` and ``dy = y (dB + dBᵀ) + x dC + 1 dsyᵀ``.
The backward ops are ops too, with autograd of their own, so double backward works.
Every op body runs with autocast off: products accumulate in fp32 whatever the caller's context.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from guidance_kernels.backends import get_backend
from guidance_kernels.backends.reference import acc_dtype


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


# --------------------------------------------------------------------------- gram
@torch.library.custom_op("guidance_kernels::gram", mutates_args=())
def gram(xs: list[Tensor], backend: str) -> list[Tensor]:
    """xs: 2-D (n_i, p_i) float tensors -> [x @ x.T] as (n_i, n_i) fp32 (fp64 for fp64)."""
    with _no_autocast(xs):
        return get_backend(backend).gram(list(xs))


@gram.register_fake
def _(xs, backend):
    return [x.new_empty((x.shape[0], x.shape[0]), dtype=acc_dtype(x.dtype)) for x in xs]


@torch.library.custom_op("guidance_kernels::gram_backward", mutates_args=())
def gram_backward(ms: list[Tensor], xs: list[Tensor], backend: str) -> list[Tensor]:
    """ms: (n_i, n_i), xs: (n_i, p_i) -> [m @ x] as (n_i, p_i) in x's dtype."""
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
    ms = [(g + g.mT) for g, n in zip(grads, need) if n]
    dxs = gram_backward(ms, _pick(xs, need), ctx.backend) if ms else []
    return _scatter(dxs, need), None


gram.register_autograd(_gram_bwd, setup_context=_gram_setup)


def _gram_backward_setup(ctx, inputs, output):
    ms, xs, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(*ms, *xs)
    ctx.count = len(xs)


def _gram_backward_bwd(ctx, grads):
    saved = ctx.saved_tensors
    ms, xs = saved[: ctx.count], saved[ctx.count :]
    need_m, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # out = m @ x: dm = dout @ xᵀ, dx = mᵀ @ dout (second-order terms; plain torch is fine).
    dms, dxs = [], []
    for g, m, x, nm, nx in zip(grads, ms, xs, need_m, need_x):
        acc = m.dtype
        dms.append((g.to(acc) @ x.to(acc).T) if nm else None)
        dxs.append((m.mT @ g.to(acc)).to(x.dtype) if nx else None)
    return dms, dxs, None


gram_backward.register_autograd(_gram_backward_bwd, setup_context=_gram_backward_setup)


# --------------------------------------------------------------------------- cross
@torch.library.custom_op("guidance_kernels::cross", mutates_args=())
def cross(
    xs: list[Tensor], ys: list[Tensor], backend: str
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Feature-space products of pairs xs[i]: (n, p), ys[i]: (n, q) ->
    ([xᵀx] (p,p), [yᵀy] (q,q), [xᵀy] (p,q), [x.sum(0)] (p,), [y.sum(0)] (q,)), fp32/fp64."""
    with _no_autocast(xs):
        return tuple(get_backend(backend).cross(list(xs), list(ys)))


@cross.register_fake
def _(xs, ys, backend):
    def e(t, *shape):
        return t.new_empty(shape, dtype=acc_dtype(t.dtype))

    return (
        [e(x, x.shape[1], x.shape[1]) for x in xs],
        [e(y, y.shape[1], y.shape[1]) for y in ys],
        [e(x, x.shape[1], y.shape[1]) for x, y in zip(xs, ys)],
        [e(x, x.shape[1]) for x in xs],
        [e(y, y.shape[1]) for y in ys],
    )


@torch.library.custom_op("guidance_kernels::cross_backward", mutates_args=())
def cross_backward(
    xs: list[Tensor], ms: list[Tensor], ys: list[Tensor], ns: list[Tensor], vs: list[Tensor], backend: str
) -> list[Tensor]:
    """[x @ m + y @ n + v] with x: (n, p), m: (p, p), y: (n, q), n: (q, p), v: (p,); x's dtype."""
    with _no_autocast(xs):
        return get_backend(backend).cross_backward(list(xs), list(ms), list(ys), list(ns), list(vs))


@cross_backward.register_fake
def _(xs, ms, ys, ns, vs, backend):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _cross_setup(ctx, inputs, output):
    xs, ys, backend = inputs
    ctx.backend = backend
    ctx.count = len(xs)
    ctx.save_for_backward(*xs, *ys)


def _cross_bwd(ctx, da, db, dc, dsx, dsy):
    saved = ctx.saved_tensors
    xs, ys = saved[: ctx.count], saved[ctx.count :]
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dxs = dys = []
    if any(need_x):
        dxs = cross_backward(
            _pick(xs, need_x),
            [a + a.mT for a in _pick(da, need_x)],
            _pick(ys, need_x),
            [c.mT for c in _pick(dc, need_x)],
            _pick(dsx, need_x),
            ctx.backend,
        )
    if any(need_y):
        dys = cross_backward(
            _pick(ys, need_y),
            [b + b.mT for b in _pick(db, need_y)],
            _pick(xs, need_y),
            _pick(dc, need_y),
            _pick(dsy, need_y),
            ctx.backend,
        )
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
    # out = x m + y n + v: dx = g mᵀ, dm = xᵀ g, dy = g nᵀ, dn = yᵀ g, dv = Σ_rows g.
    for i, (g, x, m, y, n) in enumerate(zip(grads, xs, ms, ys, ns)):
        acc = m.dtype
        g = g.to(acc)
        out[0].append((g @ m.mT).to(x.dtype) if need[0][i] else None)
        out[1].append(x.to(acc).mT @ g if need[1][i] else None)
        out[2].append((g @ n.mT).to(y.dtype) if need[2][i] else None)
        out[3].append(y.to(acc).mT @ g if need[3][i] else None)
        out[4].append(g.sum(0) if need[4][i] else None)
    return (*out, None)


cross_backward.register_autograd(_cross_backward_bwd, setup_context=_cross_backward_setup)
