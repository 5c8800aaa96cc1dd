"""``guidance_kernels::gram_stats``: the statistics linear CKA needs from stacked centered Grams,
``(P, n, n)`` each -> ``(P, 5)`` fp64 ``(Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)``, in one backend call
(one kernel launch on the Triton backend, where the torch formulation takes about 40 small ones).
:func:`guidance_kernels.metrics.cka_from_stats` turns them into CKA. Contract: ``docs/design.md``.

Backward: ``dK = g₀ L + 2 g₁ K + g₃ I``, ``dL = g₀ K + 2 g₂ L + g₄ I``, computed in fp64 and
rounded to the Grams' dtype (plain torch ops, so double backward works).
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels import metrics
from guidance_kernels.backends import get_backend

__all__ = ["gram_stats"]


def _check(k: Tensor, l: Tensor) -> None:
    if k.dim() != 3 or k.shape != l.shape or k.shape[-1] != k.shape[-2]:
        raise ValueError(
            f"guidance_kernels::gram_stats: expected two (P, n, n) stacks of one shape, got "
            f"{tuple(k.shape)} and {tuple(l.shape)}"
        )
    if k.dtype != l.dtype:
        raise ValueError(f"guidance_kernels::gram_stats: Grams of one dtype expected, got {k.dtype} and {l.dtype}")


@torch.library.custom_op("guidance_kernels::gram_stats", mutates_args=())
def gram_stats(k: Tensor, l: Tensor, backend: str) -> Tensor:
    """k, l: (P, n, n) centered Grams (one dtype) -> (P, 5) fp64 statistics (module doc)."""
    _check(k, l)
    fn = get_backend(backend).gram_stats or metrics.gram_stats
    return fn(k, l)


@gram_stats.register_fake
def _(k, l, backend):
    _check(k, l)
    return k.new_empty((k.shape[0], 5), dtype=torch.float64)


def _setup(ctx, inputs, output):
    k, l, _backend = inputs
    ctx.save_for_backward(k, l)


def _bwd(ctx, g):
    k, l = ctx.saved_tensors
    # fp64 like the statistics: d CKA / d ΣK∘K ~ 1 / ΣK∘K overflows fp32 for tiny Grams even
    # where the product with K is in range (Gram-sized temporaries only).
    g = g.double()[:, :, None, None]  # (P, 5, 1, 1)
    kd, ld = k.double(), l.double()
    dk = dl = None
    if ctx.needs_input_grad[0]:
        dk = g[:, 0] * ld + (2 * g[:, 1]) * kd
        dk.diagonal(dim1=-2, dim2=-1).add_(g[:, 3, :, 0])
        dk = dk.to(k.dtype)
    if ctx.needs_input_grad[1]:
        dl = g[:, 0] * kd + (2 * g[:, 2]) * ld
        dl.diagonal(dim1=-2, dim2=-1).add_(g[:, 4, :, 0])
        dl = dl.to(l.dtype)
    return dk, dl, None


gram_stats.register_autograd(_bwd, setup_context=_setup)
