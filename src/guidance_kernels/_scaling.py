"""Power-of-two rescaling of representations before any product is formed, so that finite but
extreme input (``|x| ~ 1e20`` in fp32, near ``3e38``; ``1e200`` in fp64; or ``1e-20`` beside an
fp64 partner) neither overflows nor underflows in Grams, cross products, their statistics or the
backward.

Every metric of the package is scale invariant per representation (degree-0 homogeneous), so
``score(s x, y) = score(x, y)`` for any ``s > 0``; with ``s`` a power of two the product ``s x``
is exact in floating point (barring subnormals). The factor is computed on the device from the
spread of ``x`` about its first row (the row shift the backends use), with no host sync, and is
held constant under autograd: ``d score / d x = s · (d score / d (s x))``, exact.

The factor is 1 (the input is returned as it is) whenever the spread ``d`` lies in
``[2^-16, 2^16]``, so ordinary activations are unchanged bit for bit; outside that window
``s = 2^-e`` brings ``d`` to ``[1, 2)`` (``e`` the binary exponent of ``d``), capped so that
``s max|x|`` stays below a quarter of the dtype's largest value. Cost when called: one read of
``x`` (column min/max) and one scaled copy; the fp32 path pays it on every call (about one
extra activation pass), see ``docs/design.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["WINDOW", "scale_factor", "rescale", "rescale_all"]

WINDOW = 16  # spreads in [2^-WINDOW, 2^WINDOW] are left alone


def _exponent(v: Tensor) -> Tensor:
    """Unbiased binary exponent of fp64 ``v >= 0`` as int64 (``v = m 2^e``, ``m`` in [1, 2));
    -1023 for 0 and subnormals, 1024 for inf/NaN. Integer bit operations only (exact everywhere)."""
    return ((v.view(torch.int64) >> 52) & 0x7FF) - 1023


def _power_of_two(k: Tensor) -> Tensor:
    """``2^k`` in fp64 for int64 ``k`` in [-1022, 1023], built from its bits (exact)."""
    return ((k + 1023) << 52).view(torch.float64)


def scale_factor(x: Tensor) -> Tensor:
    """0-dim ``x.dtype`` power of two ``s`` for a 2-D ``x`` (n, p) (module doc); detached."""
    with torch.no_grad():
        lo, hi = torch.aminmax(x.detach(), dim=0)
        lo, hi = lo.double() * 0.5, hi.double() * 0.5  # halves: differences cannot overflow fp64
        x0 = x[0].detach().double() * 0.5
        half = torch.maximum(hi - x0, x0 - lo).amax()  # half the largest |x_ij - x_0j|
        big = torch.maximum(hi.abs(), lo.abs()).amax()  # half max|x|
        e = _exponent(half) + 1  # d = 2 half has exponent e (d in [2^e, 2^(e+1)))
        emax = math.frexp(torch.finfo(x.dtype).max)[1] - 1  # largest exponent of a finite value
        k = torch.where((e >= -WINDOW) & (e <= WINDOW), torch.zeros_like(e), -e)  # else d -> [1, 2)
        k = torch.minimum(k, emax - 3 - (_exponent(big) + 1))  # s max|x| < max / 4
        k = k.clamp(-(emax - 1), emax - 1)  # s itself representable in x.dtype
        k = torch.where((half > 0) & torch.isfinite(half), k, torch.zeros_like(k))
        return _power_of_two(k).to(x.dtype)


def rescale(x: Tensor) -> Tensor:
    """``s x`` with ``s = scale_factor(x)`` (differentiable in ``x``; ``s`` held constant)."""
    return x * scale_factor(x)


def rescale_all(xs: list[Tensor]) -> list[Tensor]:
    """:func:`rescale` of each distinct tensor of ``xs`` (by identity) once; repeated tensors map
    to one rescaled tensor, so identity-based de-duplication downstream still applies."""
    done: list[tuple[Tensor, Tensor]] = []
    out = []
    for x in xs:
        for src, dst in done:
            if src is x:
                out.append(dst)
                break
        else:
            dst = rescale(x)
            done.append((x, dst))
            out.append(dst)
    return out
