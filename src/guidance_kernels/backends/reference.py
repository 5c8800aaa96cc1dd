"""Reference backend: the bilinear products in plain PyTorch (any device).

Exact math on the row-shifted activation ``x' = x - 1 x[0]`` (see the contract in
:mod:`guidance_kernels.backends`), with fp32 accumulation for fp16/bf16 inputs. Activations are
processed one column (or row) block at a time: the shift and the upcast go into one reused,
cache-sized buffer per call, never a copy of a whole activation. On CPU, fp32 Grams and their
backward use the AVX-512 / AVX2 kernels of :mod:`.cpu_gram` (shift fused into the product) when built,
else the symmetric rank-k update of :mod:`.cpu_syrk` (half the multiply-adds) when MKL provides
it, else GEMMs; every product writes straight into its slice of the result (a stacked ``(L, n, n)``
table, or ``dX``'s columns, whose blocks come from the block cache of :mod:`.cpu_pages`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels.backends import Backend, cpu_gram, cpu_pages, cpu_stats, cpu_syrk, register_backend
from guidance_kernels.planning import acc_dtype

_BLOCK_ELEMS = 1 << 22  # largest temporary, in elements (16 MiB of fp32)
_SYRK_BLOCK_ELEMS = 1 << 20  # shifted column block feeding ``?syrk`` (4 MiB of fp32; measured best)
_BWD_BLOCK_ELEMS = 1 << 19  # shifted column block of ``dX = M X'`` (2 MiB of fp32; measured)
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


def symmetric_cpu(t: Tensor, acc: torch.dtype) -> bool:
    """Whether products of ``t``'s device in ``acc`` go through ``?syrk`` (one triangle)."""
    return t.device.type == "cpu" and cpu_syrk.available(acc)


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
    sym = symmetric_cpu(x0, acc)
    elems = _SYRK_BLOCK_ELEMS if sym else _BLOCK_ELEMS
    fused = [cpu_gram.gram_available(x) for x in xs]  # shift fused into the product, full matrix out
    plans = [[] if f else _blocks(x.shape[1], n, elems) for x, f in zip(xs, fused)]
    buf = _buffer(n, plans, acc, x0.device)
    out = torch.empty((len(xs), n, n), dtype=acc, device=x0.device)
    for k, x, blocks, f in zip(out, xs, plans, fused):
        if f:
            cpu_gram.gram_(k, x)
        else:
            _gram_into(k, x, buf, blocks, sym)
    return cpu_syrk.mirror_lower(out) if sym and not all(fused) else out


def gram_backward(ms: list[Tensor], xs: list[Tensor]) -> list[Tensor]:
    out = []
    for m, x in zip(ms, xs):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        dx = _empty((n, p), x.dtype, x.device)
        m = m.to(acc)
        if cpu_gram.available(x):  # the shift fused into the product
            out.append(cpu_gram.gram_backward_(dx, m.contiguous(), x))
            continue
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


def _shift_rows_into(z: Tensor, x: Tensor, s: int, e: int, ref: Tensor | None = None) -> None:
    """``z`` (e - s, p, any row stride) <- rows ``s:e`` of ``x - ref`` in ``z``'s dtype; ``ref``
    (1, p) in ``z``'s dtype, default ``x[:1]`` (the row shift)."""
    if x.dtype == z.dtype:
        torch.sub(x[s:e], x[:1] if ref is None else ref, out=z)
    else:  # upcast first: the shift must be exact in the accumulation dtype
        z.copy_(x[s:e]).sub_(x[:1].to(z.dtype) if ref is None else ref)


def pair_buffer(x: Tensor, y: Tensor, acc: torch.dtype, blocks) -> Tensor:
    """One flat buffer for the widest row block of ``[x' y']``, reused by every block."""
    rows = max((e - s for s, e in blocks), default=0)
    return _empty(rows * (x.shape[1] + y.shape[1]), acc, x.device)


def _pair_blocks(x: Tensor, y: Tensor, acc: torch.dtype, elems: int):
    """Row blocks of the pair and their :func:`pair_buffer`."""
    blocks = _blocks(x.shape[0], x.shape[1] + y.shape[1], elems)
    return blocks, pair_buffer(x, y, acc, blocks)


def shifted_pair(buf: Tensor, x: Tensor, y: Tensor, s: int, e: int, refs=(None, None)) -> Tensor:
    """Rows ``s:e`` of ``[x - refs[0]  y - refs[1]]`` (default: the row shifts ``x'``, ``y'``),
    ``(e - s, p + q)`` in ``buf``'s dtype, written into ``buf``."""
    p = x.shape[1]
    z = buf[: (e - s) * (p + y.shape[1])].view(e - s, -1)
    _shift_rows_into(z[:, :p], x, s, e, refs[0])
    _shift_rows_into(z[:, p:], y, s, e, refs[1])
    return z


def add_zz_(full: Tensor, z: Tensor, first: bool, sym: bool) -> None:
    """``full`` (m, m) <- ``zᵀ z`` (``first``) or ``full + zᵀ z`` for a row block ``z`` (r, m)
    with unit column stride; only the lower triangle when ``sym`` (mirror it at the end)."""
    if sym:
        cpu_syrk.syrk_t_lower_(full, z, 0.0 if first else 1.0)
    elif first:
        torch.mm(z.T, z, out=full)
    else:
        full.addmm_(z.T, z)


def cross(xs: list[Tensor], ys: list[Tensor]):
    """Per pair, ``S = z'ᵀ z'`` for ``z' = [x' y']`` (one symmetric product: ``x'ᵀx'``, ``y'ᵀy'``
    and ``x'ᵀy'`` are its blocks), accumulated over row blocks; on CPU, fp32 pairs go through the
    fused kernel of :mod:`.cpu_gram`, others one ``?syrk`` per block."""
    aa, bb, cc, sx, sy = [], [], [], [], []
    for x, y in zip(xs, ys):
        acc = acc_dtype(x.dtype)
        p, q = x.shape[1], y.shape[1]
        if cpu_gram.cross_available(x, y):  # the shift fused into the packing, one triangle of tiles
            full, sums, o = cpu_gram.cross_(x, y)
            aa.append(full[:p, :p])
            bb.append(full[o : o + q, o : o + q])
            cc.append(full[:p, o : o + q])
            sx.append(sums[:p])
            sy.append(sums[o : o + q])
            continue
        sym = symmetric_cpu(x, acc)
        blocks, buf = _pair_blocks(x, y, acc, _SYRK_BLOCK_ELEMS if sym else _BLOCK_ELEMS)
        full = x.new_zeros((p + q, p + q), dtype=acc)
        sums = x.new_zeros((p + q,), dtype=acc)
        for i, (s, e) in enumerate(blocks):
            z = shifted_pair(buf, x, y, s, e)
            add_zz_(full, z, i == 0, sym)  # with sym: half the multiply-adds, mirrored below
            sums += z.sum(0)
        if sym:
            full = cpu_syrk.mirror_lower(full)
        aa.append(full[:p, :p])
        bb.append(full[p:, p:])
        cc.append(full[:p, p:])
        sx.append(sums[:p])
        sy.append(sums[p:])
    return aa, bb, cc, sx, sy


def cross_backward(xs, ms, ys, ns, vs) -> list[Tensor]:
    """``dx = [x' y'] [m; nm] + v``: on CPU, fp32 pairs through the fused kernel of
    :mod:`.cpu_gram`, others one GEMM per row block (inner size ``p + q``), written straight into
    ``dx``'s rows."""
    out = []
    for x, m, y, nm, v in zip(xs, ms, ys, ns, vs):
        acc = acc_dtype(x.dtype)
        w = torch.cat([m.to(acc), nm.to(acc)])  # (p + q, p)
        v = v.to(acc)
        dx = _empty(x.shape, x.dtype, x.device)
        if cpu_gram.cross_available(x, y, backward=True):  # the shift fused into the packing
            out.append(cpu_gram.cross_backward_(dx, x, y, w.contiguous(), v.contiguous()))
            continue
        blocks, buf = _pair_blocks(x, y, acc, _BLOCK_ELEMS)
        for s, e in blocks:
            z = shifted_pair(buf, x, y, s, e)
            if dx.dtype == acc:
                torch.addmm(v, z, w, out=dx[s:e])
            else:
                dx[s:e] = torch.addmm(v, z, w)
        out.append(dx)
    return out


register_backend(
    Backend(
        name="reference",
        gram=gram,
        gram_backward=gram_backward,
        cross=cross,
        cross_backward=cross_backward,
        gram_stats=cpu_stats.gram_stats,  # the torch formulation except for fp32 CPU stacks
        priority={"cpu": 0, "cuda": 100},
    )
)
