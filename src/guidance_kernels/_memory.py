"""Up-front memory estimates from shapes (no host sync, nothing allocated): a call whose ``n x n``
(sample form) or ``p x q`` (feature form) temporaries would not fit raises a ``ValueError``
naming the pair, the bytes and the way out, instead of dying in the allocator.

Budget: the environment variable ``GUIDANCE_KERNELS_MAX_BYTES`` (bytes, e.g. ``8e9``) if set,
else the device's memory (a CUDA device's total memory, the host's physical memory for CPU
tensors); meta tensors, and calls traced by ``torch.compile``, are not checked (run the call
once eagerly to check it). The estimates are the peak of the temporaries the call
holds at once (forward and backward), within a small factor: Grams in the accumulation dtype,
their centered copies, and the fp64 statistics / eigendecompositions of the metric.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from guidance_kernels.planning import acc_dtype

__all__ = ["ENV", "budget", "check_pairs", "check_grams"]

ENV = "GUIDANCE_KERNELS_MAX_BYTES"

# n x n fp64 temporaries per pair held by each metric's small math (fwd + bwd), on top of the
# Grams themselves (see metrics: fp64 statistics, U-centering, eigendecompositions)
_PER_PAIR_NN = {"cka": 4, "debiased_cka": 8, "procrustes": 12, "angular_procrustes": 12}
_GRAM_COPIES = 3  # the stacked Gram, its centered copy and its gradient


def budget(device: torch.device) -> float:
    """Bytes a call may plan to hold at once on ``device`` (module doc); ``inf`` for meta."""
    env = os.environ.get(ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"{ENV}={env!r} is not a number of bytes") from None
        if not value > 0:
            raise ValueError(f"{ENV}={env!r} must be a positive number of bytes")
        return value
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "meta":
        return float("inf")
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=acc_dtype(dtype)).element_size()


def _raise(where: str, need: float, limit: float, detail: str, way_out: str) -> None:
    raise ValueError(
        f"{where}: needs about {need:.3g} bytes ({detail}), over the budget of {limit:.3g} bytes "
        f"(${ENV} or the device's memory); {way_out}, or raise ${ENV}"
    )


def check_pairs(xs: Sequence[Tensor], ys: Sequence[Tensor], forms: Sequence[str], metric: str) -> None:
    """Estimate the call's peak temporaries for pairs ``(xs[i], ys[i])`` (2-D) computed in
    ``forms[i]`` with ``metric``; raise ValueError naming the largest pair if over budget."""
    if torch.compiler.is_compiling():  # checked when the call runs eagerly (traced: skipped)
        return
    limit = budget(xs[0].device)
    if limit == float("inf"):
        return
    total, worst, worst_i = 0.0, -1.0, 0
    seen: list[Tensor] = []
    for i, (x, y, f) in enumerate(zip(xs, ys, forms)):
        n, p, q, b = x.shape[0], x.shape[1], y.shape[1], _size(x.dtype)
        if f == "sample":
            grams = sum(1 for t in (x, y) if not any(t is s for s in seen))
            seen += [x, y]
            need = n * n * (_GRAM_COPIES * grams * b + 8 * _PER_PAIR_NN[metric])
        else:  # three products, their gradients, their fp64 copies in the statistics
            need = (p * p + q * q + p * q) * (2 * b + 8)
        total += need
        if need > worst:
            worst, worst_i = need, i
    if total > limit:
        x, y, f = xs[worst_i], ys[worst_i], forms[worst_i]
        n, p, q = x.shape[0], x.shape[1], y.shape[1]
        if f == "sample":
            detail = f"n x n = {n} x {n} Grams and {metric} temporaries in form='sample'"
            way = ("use form='feature' (p x q products) or a smaller batch" if metric in ("cka", "debiased_cka")
                   else f"metric {metric!r} has the sample form only: use a smaller batch")
        else:
            detail = f"p x p, q x q, p x q = {p} x {q} products in form='feature'"
            way = "use form='sample' (n x n Grams) or fewer features per layer"
        _raise(f"pair {worst_i} (target {tuple(x.shape)}, guide {tuple(y.shape)})", total, limit, detail, way)


def check_grams(xs: Sequence[Tensor], where: str, per_pair: int = 0, pairs: int = 0) -> None:
    """Estimate for the centered Grams of the distinct tensors of ``xs`` (one ``n``) plus ``pairs``
    products of ``per_pair`` fp64 ``n x n`` temporaries; raise ValueError naming ``where``."""
    if torch.compiler.is_compiling():
        return
    limit = budget(xs[0].device)
    if limit == float("inf"):
        return
    uniq: list[Tensor] = []
    for t in xs:
        if not any(t is u for u in uniq):
            uniq.append(t)
    n = xs[0].shape[0]
    need = float(n * n) * (sum(_GRAM_COPIES * _size(t.dtype) for t in uniq) + 8 * per_pair * pairs)
    if need > limit:
        _raise(where, need, limit, f"{len(uniq)} centered n x n = {n} x {n} Grams", "use a smaller batch (fewer samples)")
