"""Reference backend: the bilinear products in plain PyTorch (any device).

Exact math on the row-shifted activation ``x' = x - 1 x[0]`` (see the contract in
:mod:`guidance_kernels.backends`), with fp32 accumulation for fp16/bf16 inputs. Activations are
processed one column (or row) block at a time: the shift and the upcast make a block-sized
temporary of at most ``_BLOCK_ELEMS`` elements, never a copy of a whole activation. On CPU,
Grams use the symmetric rank-k update of :mod:`.cpu_syrk` (half the multiply-adds; one
cache-sized shifted block at a time) when MKL provides it, else GEMMs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels.backends import Backend, cpu_syrk, register_backend
from guidance_kernels.metrics import gram_stats
from guidance_kernels.planning import acc_dtype

_BLOCK_ELEMS = 1 << 22  # largest temporary, in elements (16 MiB of fp32)
_SYRK_BLOCK_ELEMS = 1 << 20  # shifted column block feeding ``?syrk`` (4 MiB of fp32; measured best)


def _blocks(total: int, other: int, elems: int = _BLOCK_ELEMS):
    step = max(1, elems // max(other, 1))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def _shifted_cols(x: Tensor, s: int, e: int, acc: torch.dtype) -> Tensor:
    """Columns ``s:e`` of ``x - 1 x[0]`` in ``acc``."""
    c = x[:, s:e].to(acc)
    return c - c[:1]


def _shift_into(buf: Tensor, x: Tensor, s: int, e: int) -> Tensor:
    """Columns ``s:e`` of ``x - 1 x[0]`` in ``buf``'s dtype, written into the reused buffer
    ``buf`` (no allocation: a fresh large block would page-fault on every call)."""
    c = buf[: x.shape[0] * (e - s)].view(x.shape[0], e - s)
    if x.dtype == buf.dtype:
        return torch.sub(x[:, s:e], x[:1, s:e], out=c)
    c.copy_(x[:, s:e])  # upcast first: the shift must be exact in the accumulation dtype
    return c.sub_(c[:1].clone())


def gram(xs: list[Tensor]) -> list[Tensor]:
    out = []
    for x in xs:
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        sym = x.device.type == "cpu" and cpu_syrk.available(acc)
        k = x.new_empty((n, n), dtype=acc)
        blocks = _blocks(p, n, _SYRK_BLOCK_ELEMS if sym else _BLOCK_ELEMS)
        buf = x.new_empty(n * (blocks[0][1] - blocks[0][0]), dtype=acc) if sym else None
        for i, (s, e) in enumerate(blocks):
            if sym:  # half the multiply-adds: one triangle, mirrored at the end
                cpu_syrk.syrk_lower_(k, _shift_into(buf, x, s, e), 0.0 if i == 0 else 1.0)
                continue
            c = _shifted_cols(x, s, e, acc)
            if i == 0:  # the first block's product, not an add into zeros
                torch.mm(c, c.T, out=k)
            else:
                k.addmm_(c, c.T)
        out.append(cpu_syrk.mirror_lower(k) if sym else k)
    return out


def gram_backward(ms: list[Tensor], xs: list[Tensor]) -> list[Tensor]:
    out = []
    for m, x in zip(ms, xs):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        m = m.to(acc)
        blocks = _blocks(p, n)
        buf = x.new_empty(n * (blocks[0][1] - blocks[0][0]), dtype=acc)
        for s, e in blocks:
            c = _shift_into(buf, x, s, e)
            if len(blocks) == 1 and dx.dtype == acc:  # the product straight into dX, no copy
                torch.mm(m, c, out=dx)
            else:
                dx[:, s:e] = m @ c
        out.append(dx)
    return out


def cross(xs: list[Tensor], ys: list[Tensor]):
    aa, bb, cc, sx, sy = [], [], [], [], []
    for x, y in zip(xs, ys):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        q = y.shape[1]
        x0, y0 = x[0].to(acc), y[0].to(acc)
        a = x.new_zeros((p, p), dtype=acc)
        b = x.new_zeros((q, q), dtype=acc)
        c = x.new_zeros((p, q), dtype=acc)
        su = x.new_zeros((p,), dtype=acc)
        sv = x.new_zeros((q,), dtype=acc)
        for s, e in _blocks(n, p + q):
            xb, yb = x[s:e].to(acc) - x0, y[s:e].to(acc) - y0
            a.addmm_(xb.T, xb)
            b.addmm_(yb.T, yb)
            c.addmm_(xb.T, yb)
            su += xb.sum(0)
            sv += yb.sum(0)
        aa.append(a)
        bb.append(b)
        cc.append(c)
        sx.append(su)
        sy.append(sv)
    return aa, bb, cc, sx, sy


def cross_backward(xs, ms, ys, ns, vs) -> list[Tensor]:
    out = []
    for x, m, y, nn_, v in zip(xs, ms, ys, ns, vs):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        x0, y0 = x[0].to(acc), y[0].to(acc)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        m, nn_, v = m.to(acc), nn_.to(acc), v.to(acc)
        for s, e in _blocks(n, p + y.shape[1]):
            xb, yb = x[s:e].to(acc) - x0, y[s:e].to(acc) - y0
            dx[s:e] = torch.addmm(v, xb, m).addmm_(yb, nn_)
        out.append(dx)
    return out


register_backend(
    Backend(
        name="reference",
        gram=gram,
        gram_backward=gram_backward,
        cross=cross,
        cross_backward=cross_backward,
        gram_stats=gram_stats,
        priority={"cpu": 0, "cuda": 100},
    )
)
