"""Reference backend: the bilinear products in plain PyTorch (any device).

Exact math with fp32 accumulation for fp16/bf16 inputs: low-precision activations are upcast
one column (or row) block at a time, so the largest temporary is ``_BLOCK_ELEMS`` elements,
never a whole activation. fp32 and fp64 inputs are used in place (no copies).
See :mod:`guidance_kernels.backends` for the contract of each function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels.backends import Backend, register_backend

_BLOCK_ELEMS = 1 << 22  # largest upcast temporary, in elements (16 MiB of fp32)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for activations of ``dtype``: fp64 stays fp64, all else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(total: int, other: int):
    step = max(1, _BLOCK_ELEMS // max(other, 1))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def gram(xs: list[Tensor]) -> list[Tensor]:
    out = []
    for x in xs:
        acc = acc_dtype(x.dtype)
        if x.dtype == acc:
            out.append(x @ x.T)
            continue
        n, p = x.shape
        k = x.new_zeros((n, n), dtype=acc)
        for s, e in _blocks(p, n):
            c = x[:, s:e].to(acc)
            k.addmm_(c, c.T)
        out.append(k)
    return out


def gram_backward(ms: list[Tensor], xs: list[Tensor]) -> list[Tensor]:
    out = []
    for m, x in zip(ms, xs):
        acc = acc_dtype(x.dtype)
        if x.dtype == acc:
            out.append(m.to(acc) @ x)
            continue
        n, p = x.shape
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        m = m.to(acc)
        for s, e in _blocks(p, n):
            dx[:, s:e] = m @ x[:, s:e].to(acc)
        out.append(dx)
    return out


def cross(xs: list[Tensor], ys: list[Tensor]):
    aa, bb, cc, sx, sy = [], [], [], [], []
    for x, y in zip(xs, ys):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        q = y.shape[1]
        a = x.new_zeros((p, p), dtype=acc)
        b = x.new_zeros((q, q), dtype=acc)
        c = x.new_zeros((p, q), dtype=acc)
        for s, e in _blocks(n, p + q):
            xb, yb = x[s:e].to(acc), y[s:e].to(acc)
            a.addmm_(xb.T, xb)
            b.addmm_(yb.T, yb)
            c.addmm_(xb.T, yb)
        aa.append(a)
        bb.append(b)
        cc.append(c)
        sx.append(x.sum(0, dtype=acc))
        sy.append(y.sum(0, dtype=acc))
    return aa, bb, cc, sx, sy


def cross_backward(xs, ms, ys, ns, vs) -> list[Tensor]:
    out = []
    for x, m, y, nn_, v in zip(xs, ms, ys, ns, vs):
        acc = acc_dtype(x.dtype)
        n, p = x.shape
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        m, nn_, v = m.to(acc), nn_.to(acc), v.to(acc)
        for s, e in _blocks(n, p + y.shape[1]):
            dx[s:e] = torch.addmm(v, x[s:e].to(acc), m).addmm_(y[s:e].to(acc), nn_)
        out.append(dx)
    return out


register_backend(
    Backend(
        name="reference",
        gram=gram,
        gram_backward=gram_backward,
        cross=cross,
        cross_backward=cross_backward,
        priority={"cpu": 0, "cuda": 100},
    )
)
