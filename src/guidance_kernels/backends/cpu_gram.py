"""The row-shifted Gram ``x' x'ᵀ`` (``x' = x - 1 x[0]``) of an fp32 CPU activation and its backward
``dX = M x'`` through the kernels of ``guidance_kernels._cpu`` (``csrc/cpu/gram_shifted.cpp``;
AVX-512 or AVX2 + FMA, the best the CPU runs: :func:`isa`): the shift is fused into the packing
of each product, the Gram computes one triangle of 16x16 tiles, the backward writes ``dX`` with
streaming stores, and threads split the columns. They replace "shift a column block into a buffer, then MKL ``?syrk``
/ GEMM" (:mod:`.reference`), which reads every activation twice. The feature form's ``z'ᵀz'``
(``z' = [x' y']``, ``csrc/cpu/cross_shifted.cpp``) uses the same tiles on rows packed without a
transpose: :func:`cross_`, and its backward ``[x' y'] w + 1 vᵀ``: :func:`cross_backward_`.

Used when the extension is built, the CPU has AVX-512 or AVX2 + FMA, the kernels matched float64 on a small
case at first use, and the input is fp32 with unit column stride and ``n <= MAX_N``; the Gram
also needs its extra threads' private ``n x n`` Grams to fit in ``PRIVATE_BYTES``.
``GK_NO_CPU_KERNEL=1`` in the environment turns both off (the MKL path then runs).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
from torch import Tensor

__all__ = ["KC", "KC_BWD", "KC_CROSS", "MAX_N", "PRIVATE_BYTES", "extension", "isa", "available", "gram_available",
           "gram_", "gram_backward_", "cross_available", "cross_", "cross_backward_", "recording_ranges", "key"]

KC = 384  # columns per packed block: 24 KiB per 16-row group; 256..384 measured best (L1 48 KiB)
KC_BWD = 512  # columns of x' packed per pass of the backward (512 KiB at n = 256: L2)
KC_CROSS = 384  # rows of z' packed per block of the feature form (96..768 within noise on Zen 3)
MAX_N = 2048  # largest n of both kernels
PRIVATE_BYTES = 64 << 20  # the Gram's private n² fp32 per extra thread, all threads together


def extension():
    """``guidance_kernels._cpu``, or None when it is not built or ``GK_NO_CPU_KERNEL`` is set
    (the caller still verifies the kernels it uses)."""
    if os.environ.get("GK_NO_CPU_KERNEL", "") not in ("", "0"):
        return None
    try:
        from guidance_kernels import _cpu
    except ImportError:
        return None
    return _cpu


def _verify(_cpu, isa: str) -> bool:
    """Whether every kernel of the ``isa`` table matches float64 on a small case with edge
    groups (n = 37), several blocks and two chunks (fp32 tensors whatever the default dtype)."""
    f32 = dict(dtype=torch.float32)
    x = torch.arange(37 * 70, **f32).reshape(37, 70).sin().add_(3.0)
    got, rng = torch.full((37, 37), float("nan"), **f32), torch.empty(2, **f32)
    _cpu.gram_shifted_(x, got, 16, 2, rng, isa)
    xd = x.double() - x[:1].double()
    m = torch.arange(37 * 37, **f32).reshape(37, 37).cos()
    dx = torch.full((37, 70), float("nan"), **f32)
    _cpu.gram_backward_shifted_(m, x, dx, 32, 2, isa)
    a, b = x.T.contiguous(), m[:, :19].contiguous().repeat(2, 1)[:70]  # the feature form: n = 70, p = 37, q = 19
    s, sums = torch.full((80, 80), float("nan"), **f32), torch.full((80,), float("nan"), **f32)
    _cpu.cross_shifted_(a, b, s, sums, 8, 2, isa)
    z = torch.zeros(70, 80, dtype=torch.float64)
    z[:, :37], z[:, 48:67] = a.double() - a[:1].double(), b.double() - b[:1].double()
    w = torch.arange(56 * 37, **f32).reshape(56, 37).mul_(0.1).sin_()
    bias, dxc = m[0].contiguous(), torch.full((70, 37), float("nan"), **f32)
    _cpu.cross_backward_shifted_(a, b, w, bias, dxc, 2, isa)
    zw = torch.cat([z[:, :37], z[:, 48:67]], 1) @ w.double() + bias.double()
    pairs = ((got, xd @ xd.T), (dx, m.double() @ xd), (s, z.T @ z), (sums, z.sum(0)), (dxc, zw))
    ok = all(bool(((u.double() - v).abs() <= 1e-5 * v.abs().max()).all()) for u, v in pairs)
    return ok and torch.equal(rng, torch.stack(torch.aminmax(x)))


@functools.lru_cache(maxsize=None)
def _verified():
    """``(module, isa)``: the extension and the best instruction set whose kernels all match
    float64 at first use (a table that disagrees is skipped, not used), or ``(None, None)``."""
    _cpu = extension()
    if _cpu is None:
        return None, None
    for name in _cpu.isas():  # best first
        if _verify(_cpu, name):
            return _cpu, name
    return None, None


def _module():
    """The verified extension module, or None."""
    return _verified()[0]


def isa() -> str | None:
    """The instruction set of the kernels in use (``"avx512"`` or ``"avx2"``), None when unused."""
    return _verified()[1]


def _kernel_input(t: Tensor) -> bool:
    """A 2-D fp32 CPU tensor with unit column stride: what every kernel reads."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)


def _padded(cols: int) -> int:
    return 16 * -(-cols // 16)


def cross_available(x: Tensor, y: Tensor, backward: bool = False) -> bool:
    """Whether :func:`cross_` (or, with ``backward``, :func:`cross_backward_`) runs for the pair
    ``x`` (n, p), ``y`` (n, q): both fp32 CPU tensors with unit column stride, and for the
    forward, the extra threads' private ``m x m`` products (``m``: the padded ``p + q``) fit in
    ``PRIVATE_BYTES`` (beyond that, MKL's ``?syrk`` shares one output)."""
    m = _padded(x.shape[-1]) + _padded(y.shape[-1])
    return (
        _kernel_input(x)
        and _kernel_input(y)
        and x.shape[0] == y.shape[0]
        and (backward or 4 * m * m * (torch.get_num_threads() - 1) <= PRIVATE_BYTES)
        and _module() is not None
    )


def cross_(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(S, sums, off)`` for ``x`` (n, p), ``y`` (n, q) (:func:`cross_available` must hold):
    ``S`` (m, m, fp32) ``= z'ᵀz'`` and ``sums`` (m, fp32) its column sums, ``z' = [x' y']`` with
    each side's features padded with zeros to a multiple of 16; ``y``'s features start at
    ``off``, so ``S[:p, :p] = x'ᵀx'``, ``S[off:off + q, off:off + q] = y'ᵀy'`` and
    ``S[:p, off:off + q] = x'ᵀy'``."""
    off = _padded(x.shape[1])
    m = off + _padded(y.shape[1])
    s, sums = torch.empty(m, m, dtype=torch.float32), torch.empty(m, dtype=torch.float32)
    _module().cross_shifted_(x, y, s, sums, KC_CROSS, torch.get_num_threads(), isa())
    return s, sums, off


def cross_backward_(dx: Tensor, x: Tensor, y: Tensor, w: Tensor, v: Tensor) -> Tensor:
    """``dx`` (n, p, fp32, unit column stride) <- ``[x' y'] w + 1 vᵀ`` for ``w`` (p + q, p) and ``v``
    (p), contiguous fp32; ``cross_available(x, y, backward=True)`` must hold."""
    _module().cross_backward_shifted_(x, y, w, v, dx, torch.get_num_threads(), isa())
    return dx


def available(x: Tensor) -> bool:
    """Whether :func:`gram_backward_` runs for ``x`` (n, p)."""
    return _kernel_input(x) and 0 < x.shape[0] <= MAX_N and _module() is not None


def gram_available(x: Tensor) -> bool:
    """Whether :func:`gram_` runs for ``x``: :func:`available`, and the extra threads' private
    ``n x n`` Grams fit in ``PRIVATE_BYTES`` (with many threads and a large ``n``, MKL's
    ``?syrk``, which shares one output, is the better choice)."""
    return available(x) and 4 * x.shape[0] ** 2 * (torch.get_num_threads() - 1) <= PRIVATE_BYTES


_local = threading.local()
_NO_RANGE = torch.empty(0)


def key(x: Tensor) -> tuple:
    """What identifies an activation across the op boundary (the op may see another Python
    object for the same tensor): its storage address, shape and strides."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


@contextlib.contextmanager
def recording_ranges():
    """Within the block, every :func:`gram_` on this thread records ``{key(x): (min, max)}`` of its
    input (read during the packing, at no extra pass) in the dict this yields."""
    prev = getattr(_local, "ranges", None)
    _local.ranges = seen = {}
    try:
        yield seen
    finally:
        _local.ranges = prev


def gram_backward_(dx: Tensor, m: Tensor, x: Tensor) -> Tensor:
    """``dx`` (n, p, fp32, unit column stride) <- ``m x'`` for ``m`` (n, n, fp32, contiguous) and
    ``x`` (n, p, fp32); :func:`available` must hold for ``x``."""
    _module().gram_backward_shifted_(m, x, dx, KC_BWD, torch.get_num_threads(), isa())
    return dx


def gram_(out: Tensor, x: Tensor) -> Tensor:
    """``out`` (n, n, fp32, contiguous) <- the full symmetric ``x' x'ᵀ`` of ``x`` (n, p, fp32);
    :func:`gram_available` must hold. Inside :func:`recording_ranges`, also records ``x``'s min and
    max."""
    seen = getattr(_local, "ranges", None)
    rng = _NO_RANGE if seen is None else torch.empty(2, dtype=torch.float32)
    _module().gram_shifted_(x, out, KC, torch.get_num_threads(), rng, isa())
    if seen is not None:
        seen[key(x)] = rng
    return out
