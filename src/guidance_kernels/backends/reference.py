"""Reference backend: the bilinear products in plain PyTorch (any device).

Exact math on the row-shifted activation ``x' = x - 1 x[0]`` (see the contract in
:mod:`guidance_kernels.backends`), with fp32 accumulation for fp16/bf16 inputs. Activations are
processed one column (or row) block at a time: the shift and the upcast go into one reused,
cache-sized buffer per call, never a copy of a whole activation. On CPU, Grams use the
symmetric rank-k update of :mod:`.cpu_syrk` (half the multiply-adds) when MKL provides it, else
GEMMs; every product writes straight into its slice of the result (a stacked ``(L, n, n)``
table, or ``dX``'s columns, whose pages are advised huge: :mod:`.cpu_pages`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels.backends import Backend, cpu_pages, cpu_syrk, register_backend
from guidance_kernels.metrics import gram_stats
from guidance_kernels.planning import acc_dtype

_BLOCK_ELEMS = 1 << 22  # largest temporary, in elements (16 MiB of fp32)
_SYRK_BLOCK_ELEMS = 1 << 20  # shifted column block feeding ``?syrk`` (4 MiB of fp32; measured best)
_BWD_BLOCK_ELEMS = 1 << 18  # shifted column block of ``dX = M X'`` (1 MiB of fp32; measured)
_BWD_MIN_COLS = 512  # below this width the GEMM re-reads M (n x n) too often for large n


def _blocks(total: int, other: int, elems: int = _BLOCK_ELEMS, min_step: int = 1):
    step = max(min_step, elems // max(other, 1))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def _buffer(n: int, plans, acc: torch.dtype, device: torch.device) -> Tensor:
    """One flat buffer for the widest column block of the ``plans`` (n rows), reused by all."""
    width = max((e - s for blocks in plans for s, e in blocks), default=0)
    return _empty(n * width, acc, device)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return cpu_pages.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _shift_into(buf: Tensor, x: Tensor, s: int, e: int) -> Tensor:
    """Columns ``s:e`` of ``x - 1 x[0]`` in ``buf``'s dtype, written into the reused buffer
    ``buf`` (no allocation: a fresh large block would page-fault on every call)."""
    c = buf[: x.shape[0] * (e - s)].view(x.shape[0], e - s)
    if x.dtype == buf.dtype:
        return torch.sub(x[:, s:e], x[:1, s:e], out=c)
    c.copy_(x[:, s:e])  # upcast first: the shift must be exact in the accumulation dtype
    return c.sub_(c[:1].clone())


def _gram_into(k: Tensor, x: Tensor, buf: Tensor, blocks, sym: bool) -> None:
    """``k`` (n, n, contiguous) <- ``x' x'ᵀ`` (only its lower triangle when ``sym``)."""
    if not blocks:  # no features: the Gram of nothing
        k.zero_()
    for i, (s, e) in enumerate(blocks):
        c = _shift_into(buf, x, s, e)
        if sym:  # half the multiply-adds: one triangle, mirrored by the caller
            cpu_syrk.syrk_lower_(k, c, 0.0 if i == 0 else 1.0)
        elif i == 0:  # the first block's product, not an add into zeros
            torch.mm(c, c.T, out=k)
        else:
            k.addmm_(c, c.T)


def gram(xs: list[Tensor]):
    """The Grams ``x' x'ᵀ``: one ``(L, n, n)`` stacked tensor when every ``x`` has the same ``n``
    and accumulation dtype (what ``ops.gram`` passes), else a list."""
    accs = {acc_dtype(x.dtype) for x in xs}
    if len({x.shape[0] for x in xs}) != 1 or len(accs) != 1:
        return [gram([x])[0] for x in xs]
    acc, x0 = accs.pop(), xs[0]
    n = x0.shape[0]
    sym = x0.device.type == "cpu" and cpu_syrk.available(acc)
    elems = _SYRK_BLOCK_ELEMS if sym else _BLOCK_ELEMS
    plans = [_blocks(x.shape[1], n, elems) for x in xs]
    buf = _buffer(n, plans, acc, x0.device)
    out = torch.empty((len(xs), n, n), dtype=acc, device=x0.device)
    for k, x, blocks in zip(out, xs, plans):
        _gram_into(k, x, buf, blocks, sym)
    return cpu_syrk.mirror_lower(out) if sym else out


def gram_backward(ms: list[Tensor], xs: list[Tensor]) -> list[Tensor]:
    out = []
    for m, x in zip(ms, xs):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        dx = _empty((n, p), x.dtype, x.device)
        m = m.to(acc)
        blocks = _blocks(p, n, _BWD_BLOCK_ELEMS, _BWD_MIN_COLS)
        buf = _buffer(n, [blocks], acc, x.device)
        for s, e in blocks:
            c = _shift_into(buf, x, s, e)
            if dx.dtype == acc:  # the product straight into dX's columns (a strided GEMM output)
                torch.mm(m, c, out=dx[:, s:e])
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
