"""The CKA statistics of stacked fp32 centered Grams on the CPU in one pass, forward and backward
(``csrc/cpu/gram_stats.cpp`` in ``guidance_kernels._cpu``), instead of the torch formulation's
fp64 Gram-sized temporaries: on the loss row of ``bench/cpu_targets.py`` (8 pairs, n = 256) the
forward took 0.5 ms instead of 7 ms and the backward 1.3 ms instead of 16 ms (2-core VM).

Same contract as :func:`guidance_kernels.metrics.gram_stats` (forward: fp64 sums of the exact
fp64 products, in another order: equal to a few fp64 ulps) and ``ops/stats.py``'s backward (the
same fp64 operations in the same order, rounded to fp32: bit-identical where the compiler does
not contract them, which the build forbids). Used for contiguous fp32 CPU stacks when the
extension is built and matched the torch formulation on a small case at first use; the backward
only outside ``create_graph`` (the torch formulation is differentiable, the kernel is not).
``GK_NO_CPU_KERNEL=1`` turns it off like the Gram kernels.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from guidance_kernels import metrics
from guidance_kernels.backends import cpu_gram

__all__ = ["available", "gram_stats", "gram_stats_backward", "torch_backward"]


def torch_backward(g: Tensor, k: Tensor, l: Tensor, need_k: bool, need_l: bool):
    """``dK = g₀ L + 2 g₁ K + g₃ I``, ``dL = g₀ K + 2 g₂ L + g₄ I`` in fp64, rounded to the Grams'
    dtype (plain torch ops: differentiable again); ``g`` (P, 5), ``k``, ``l`` (P, n, n)."""
    g = g.double()[:, :, None, None]  # (P, 5, 1, 1)
    kd, ld = k.double(), l.double()
    dk = dl = None
    if need_k:
        dk = g[:, 0] * ld + (2 * g[:, 1]) * kd
        dk.diagonal(dim1=-2, dim2=-1).add_(g[:, 3, :, 0])
        dk = dk.to(k.dtype)
    if need_l:
        dl = g[:, 0] * kd + (2 * g[:, 2]) * ld
        dl.diagonal(dim1=-2, dim2=-1).add_(g[:, 4, :, 0])
        dl = dl.to(l.dtype)
    return dk, dl


@functools.lru_cache(maxsize=None)
def _module():
    """The extension module if its statistics kernels match the torch formulation, else None."""
    _cpu = cpu_gram.extension()
    if _cpu is None:
        return None
    # an odd n (the row tail past a multiple of 8), offset values, three pairs
    k = torch.arange(3 * 13 * 13, dtype=torch.float32).reshape(3, 13, 13).sin().add_(2.0)
    l = torch.arange(3 * 13 * 13, dtype=torch.float32).reshape(3, 13, 13).cos()
    st = torch.full((3, 5), float("nan"), dtype=torch.float64)
    _cpu.gram_stats_(k, l, st)
    want = metrics.gram_stats(k, l)
    g = torch.linspace(-2.0, 3.0, 15, dtype=torch.float64).reshape(3, 5)
    dk, dl = torch.full_like(k, float("nan")), torch.full_like(l, float("nan"))
    _cpu.gram_stats_backward_(g, k, l, dk, dl)
    wk, wl = torch_backward(g, k, l, True, True)
    close = bool(((st - want).abs() <= 1e-12 * want.abs().amax(0)).all())
    ok = close and all(bool(((a - b).abs() <= 1e-6 * b.abs().amax()).all()) for a, b in ((dk, wk), (dl, wl)))
    if not ok:
        return None  # never use a kernel that disagrees with the reference
    return _cpu


def available(k: Tensor, l: Tensor) -> bool:
    """Whether the kernels run for ``k``, ``l``: contiguous fp32 CPU ``(P, n, n)`` stacks."""
    return (
        k.device.type == "cpu"
        and k.dtype == torch.float32
        and l.dtype == torch.float32
        and l.device.type == "cpu"
        and k.dim() == 3
        and k.shape == l.shape
        and k.is_contiguous()
        and l.is_contiguous()
        and _module() is not None
    )


def gram_stats(k: Tensor, l: Tensor) -> Tensor:
    """(P, n, n) centered Grams -> (P, 5) fp64, as :func:`guidance_kernels.metrics.gram_stats`;
    the kernel where :func:`available`, else that function."""
    if not available(k, l):
        return metrics.gram_stats(k, l)
    out = torch.empty((k.shape[0], 5), dtype=torch.float64)
    _module().gram_stats_(k, l, out)
    return out


@torch.library.custom_op("guidance_kernels::gram_stats_backward_cpu", mutates_args=())
def _fused_backward(g: Tensor, k: Tensor, l: Tensor, need_k: bool, need_l: bool) -> tuple[Tensor, Tensor]:
    """The kernel as an op (so that tracing records it instead of running it on fake tensors):
    ``(dk, dl)``, each empty when not needed."""
    dk = torch.empty_like(k) if need_k else k.new_empty(0)
    dl = torch.empty_like(l) if need_l else l.new_empty(0)
    _module().gram_stats_backward_(g.double().contiguous(), k, l, dk, dl)
    return dk, dl


@_fused_backward.register_fake
def _(g, k, l, need_k, need_l):
    return (torch.empty_like(k) if need_k else k.new_empty(0)), (torch.empty_like(l) if need_l else l.new_empty(0))


def gram_stats_backward(g: Tensor, k: Tensor, l: Tensor, need_k: bool, need_l: bool):
    """:func:`torch_backward`, by the kernel where :func:`available` and no graph is being built
    (``torch.is_grad_enabled()`` is False inside a plain ``backward()``)."""
    if torch.is_grad_enabled() or not available(k, l):
        return torch_backward(g, k, l, need_k, need_l)
    dk, dl = _fused_backward(g, k, l, need_k, need_l)
    return (dk if need_k else None), (dl if need_l else None)
