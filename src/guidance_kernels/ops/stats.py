"""``guidance_kernels::gram_stats``: the statistics linear CKA needs from stacked centered Grams,
``(P, n, n)`` each -> ``(P, 5)`` fp64 ``(Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)``, in one backend call
(one kernel launch on the Triton backend, where the torch formulation takes about 40 small ones).
:func:`guidance_kernels.metrics.cka_from_stats` turns them into CKA. Contract: ``docs/design.md``.

Backward: ``dK = g₀ L + 2 g₁ K + g₃ I``, ``dL = g₀ K + 2 g₂ L + g₄ I``, computed in fp64 and
rounded to the Grams' dtype (``backends/cpu_stats.py``: plain torch ops, so double backward
works; on fp32 CPU stacks outside ``create_graph``, one pass of the CPU extension instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels import metrics
from guidance_kernels.backends import cpu_stats, get_backend

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
    # where the product with K is in range (Gram-sized temporaries only, or none on the CPU kernel)
    dk, dl = cpu_stats.gram_stats_backward(g, k, l, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return dk, dl, None


gram_stats.register_autograd(_bwd, setup_context=_setup)
