"""Power-of-two rescaling of representations before any product is formed, so that finite but
extreme input (``|x| ~ 1e20`` in fp32, near ``3e38``; ``1e200`` in fp64; or ``1e-20`` beside an
fp64 partner) neither overflows nor underflows in Grams, cross products, their statistics or the
backward.

Every metric of the package is scale invariant per representation (degree-0 homogeneous), so
``score(s x, y) = score(x, y)`` for any ``s > 0``; with ``s`` a power of two the product ``s x``
is exact in floating point (barring subnormals). The factor comes from ``m = max|x|``, computed
on the device (one min/max pass per input), with no host sync, and is held
constant under autograd: ``d score / d x = s · (d score / d (s x))``, exact.

``s = 1`` whenever ``m`` lies in ``[2^-16, 2^16)``, so ordinary activations give the same
scores bit for bit; outside that window ``s = 2^-e`` brings ``m`` to ``[1, 2)`` (``e`` the binary
exponent of ``m``). Then every shifted entry ``|x_ij - x_0j| < 2^17``, so Grams and cross
products stay far from overflow, and the spread about an offset is at least the dtype's
relative precision of ``m``, so their squares stay far from underflow (fp32: ``>= 1e-12``).
Zero, constant and non-finite input keeps ``s = 1`` (degenerate / NaN as before). Limits: the
gradient of a score is ``~1/|x|``, so for fp32 input below ``~1e-38`` (subnormal) the true
gradient itself is outside fp32's range.

Cost: one read of every input (the min/max) and, on accelerators, one scaled copy (read +
write, and its gradient) per call whatever the factor (deciding on the host would sync). CPU
tensors read the factor for free and skip the copy when it is 1. On CPU, when every input goes
to the fused Gram kernel (``backends/cpu_gram.py``), ``functional`` skips the min/max pass: the
kernel reads min and max while packing, and the result is kept when :func:`all_unscaled` says
every factor is 1 (exactly what this module would have used); otherwise it is recomputed
through :func:`rescale_all`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance_kernels.planning import unique

__all__ = ["WINDOW", "scale_factor", "scale_factors", "rescale_all"]

WINDOW = 16  # max|x| in [2^-WINDOW, 2^WINDOW) is left alone


def _exponent(v: Tensor) -> Tensor:
    """Unbiased binary exponent of fp64 ``v >= 0`` as int64 (``v = m 2^e``, ``m`` in [1, 2));
    -1023 for 0 and subnormals, 1024 for inf/NaN. Integer bit operations only (exact everywhere)."""
    return ((v.view(torch.int64) >> 52) & 0x7FF) - 1023


def _power_of_two(k: Tensor) -> Tensor:
    """``2^k`` in fp64 for int64 ``k`` in [-1022, 1023], built from its bits (exact)."""
    return ((k + 1023) << 52).view(torch.float64)


def _exponents(xs: list[Tensor]) -> list[tuple[list[int], Tensor, torch.dtype]]:
    """Per group of one dtype and device: (positions, int64 ``k`` with ``s = 2^k``, dtype)."""
    out = []
    with torch.no_grad():
        by_dtype: dict = {}
        for i, x in enumerate(xs):
            by_dtype.setdefault((x.dtype, x.device), []).append(i)
        for (dtype, _), idx in by_dtype.items():
            # max|x| = max(max x, -min x): one min/max pass (several times faster than |x|'s
            # max-norm on CPU), no |x| temporary
            mm = torch.stack([torch.stack(torch.aminmax(xs[i].detach())) for i in idx])
            out.append((idx, _exponents_of_ranges(mm, dtype), dtype))
    return out


def _exponents_of_ranges(mm: Tensor, dtype: torch.dtype) -> Tensor:
    """int64 ``k`` (``s = 2^k``) of each row ``(min, max)`` of ``mm`` (L, 2) for tensors of ``dtype``."""
    mm = mm.double()
    m = torch.maximum(mm[:, 1], -mm[:, 0])
    e = _exponent(m)  # m in [2^e, 2^(e+1))
    emax = math.frexp(torch.finfo(dtype).max)[1] - 1  # largest exponent of a finite value
    k = torch.where((e >= -WINDOW) & (e < WINDOW), torch.zeros_like(e), -e)
    k = k.clamp(-(emax - 1), emax - 1)  # s representable in the dtype (subnormal input)
    return torch.where((m > 0) & torch.isfinite(m), k, torch.zeros_like(k))


def all_unscaled(ranges: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether every ``(min, max)`` of ``ranges`` (CPU tensors of 2) gives ``s = 1``, i.e. whether
    :func:`rescale_all` would return those tensors unchanged (a host read: CPU callers only)."""
    return not bool(_exponents_of_ranges(torch.stack(ranges), dtype).any())


def scale_factors(xs: list[Tensor]) -> list[Tensor]:
    """0-dim power of two ``s_i`` (in ``xs[i].dtype``, detached) for each tensor of ``xs``
    (module doc): one min/max pass per tensor, then the exponent arithmetic for all tensors of
    a dtype at once on a short fp64 vector."""
    out: list = [None] * len(xs)
    for idx, k, dtype in _exponents(xs):
        for j, s in zip(idx, _power_of_two(k).to(dtype).unbind(0)):
            out[j] = s
    return out


def _rescale_distinct(xs: list[Tensor]) -> list[Tensor]:
    out: list = [None] * len(xs)
    eager = not torch.compiler.is_compiling()
    for idx, k, dtype in _exponents(xs):
        if eager and k.device.type == "cpu":
            # CPU: reading the exponents is no device sync (one read per dtype); the common
            # in-window case (k = 0) skips the scaled copy
            for j, kj in zip(idx, k.tolist()):
                out[j] = xs[j] if kj == 0 else xs[j] * _power_of_two(torch.tensor(kj)).to(dtype)
        else:  # accelerators / traced: always multiply, never wait on the device
            for j, s in zip(idx, _power_of_two(k).to(dtype).unbind(0)):
                out[j] = xs[j] * s
    return out


def rescale_all(xs: list[Tensor]) -> list[Tensor]:
    """``s_i x_i`` for each distinct tensor of ``xs`` (by identity) once, differentiable in
    ``x_i`` with ``s_i`` held constant; repeated tensors map to one rescaled tensor, so identity
    based de-duplication downstream still applies."""
    uniq, index = unique(xs)
    scaled = _rescale_distinct(uniq)
    return [scaled[j] for j in index]


def scale_factor(x: Tensor) -> Tensor:
    """:func:`scale_factors` of one tensor."""
    return scale_factors([x])[0]
