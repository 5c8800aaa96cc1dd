"""Backend registry: the one dispatch point for the heavy, activation-sized work. The contract
(products, formulas, how a backend plugs in) is in ``docs/design.md``.

Every metric in this package (CKA, debiased CKA, Procrustes, CKA matrices) is computed from a
few *bilinear products* of the activations, plus small ``n x n`` / ``p x q`` math that is
shared by all backends (see :mod:`guidance_kernels.metrics`). A backend implements just the
products, for a whole list of layers in as few launches as it can.

**Every product uses the row-shifted activation** ``x' = x - 1 x[0]`` (each sample minus the
first sample, i.e. ``x'[i, f] = x[i, f] - x[0, f]``). Centering is invariant to that shift, and
it removes the common offset that deep layers share (in a default-initialised deep MLP,
``||Kc|| / ||K||`` falls to 1e-6 by layer 8): centering a raw fp32 Gram there cancels
catastrophically, centering a shifted one does not. Kernels subtract ``x[0, f]`` as they load.

``gram(xs) -> list[Tensor]``
    ``xs[i]``: 2-D ``(n_i, p_i)`` float tensor (fp64/fp32/fp16/bf16, any strides).
    Returns ``x' @ x'.T``, shape ``(n_i, n_i)``, in the accumulation dtype
    (fp64 for fp64 inputs, fp32 otherwise): a list, or (when every ``n_i`` and accumulation
    dtype agree) one fresh stacked ``(L, n, n)`` tensor, which the op then centres in place.
``gram_backward(ms, xs) -> list[Tensor]``
    ``ms[i]``: ``(n_i, n_i)`` accumulation-dtype matrix (symmetric and centered in practice).
    Returns ``ms[i] @ x'``, shape ``(n_i, p_i)``, in ``xs[i].dtype``.
``cross(xs, ys) -> (list[Tensor],) * 5``
    Feature-space products of pairs ``xs[i]: (n_i, p_i)``, ``ys[i]: (n_i, q_i)`` (``y'`` shifted
    by ``y[0]`` likewise): ``(x'ᵀx' (p,p), y'ᵀy' (q,q), x'ᵀy' (p,q), x'.sum(0) (p,),
    y'.sum(0) (q,))``, accumulation dtype.
``cross_backward(xs, ms, ys, ns, vs) -> list[Tensor]``
    Returns ``x' @ ms[i] + y' @ ns[i] + vs[i]`` (``vs[i]`` broadcast over rows),
    shape ``(n_i, p_i)``, in ``xs[i].dtype``. ``ms[i]: (p,p)``, ``ns[i]: (q,p)``, ``vs[i]: (p,)``.

``gram_stats(k, l) -> Tensor`` (optional; the reference implementation is used when ``None``)
    ``k``, ``l``: ``(P, n, n)`` contiguous centered Grams of one dtype. Returns ``(P, 5)`` fp64
    ``(Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)`` per pair: everything linear CKA needs.

A backend module registers itself with :func:`register_backend` and must never sync with the
host (no ``.item()``, no branching on tensor values). Availability is checked by ``available``,
which returns ``None`` if usable for the given device or a string saying why not.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Backend", "register_backend", "get_backend", "resolve_backend", "list_backends"]


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    gram: Callable
    gram_backward: Callable
    cross: Callable
    cross_backward: Callable
    available: Callable[[torch.device], Optional[str]] = lambda device: None
    gram_stats: Optional[Callable] = None
    # Lower is preferred by backend="auto" on a device where the backend is available.
    priority: dict = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Backend] = {}
# Modules that register a backend on import; imported lazily so that a missing toolchain
# (no Triton, no compiled extension) only matters when that backend is asked for.
_LAZY = {
    "reference": "guidance_kernels.backends.reference",
    "triton": "guidance_kernels.backends.triton",
    "cuda": "guidance_kernels.backends.cuda",
}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def list_backends() -> list[str]:
    return list(_LAZY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        if name not in _LAZY:
            raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *_LAZY]}")
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as e:  # a backend whose toolchain is missing
            raise RuntimeError(f"backend {name!r} is not available: {e}") from e
        if name not in _REGISTRY:
            raise RuntimeError(f"backend {name!r} is not available (module did not register)")
    return _REGISTRY[name]


def _why_unavailable(name: str, device: torch.device) -> Optional[str]:
    try:
        return get_backend(name).available(device)
    except RuntimeError as e:
        return str(e)


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor], shape_class: Optional[str] = None) -> str:
    """Pick the backend name for ``tensors`` (all on one device). ``"auto"`` picks, on CUDA, the
    backend measured fastest for this device and ``shape_class`` (:mod:`.dispatch`) when the
    committed table has it, else the available backend with the lowest priority number
    (reference everywhere else). Under ``torch.compile`` the answer is computed eagerly and baked
    in as a constant."""
    device = tensors[0].device if tensors else torch.device("cpu")
    return _resolve(backend, device.type, device.index, shape_class)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, index: Optional[int], shape_class: Optional[str] = None) -> str:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if backend != "auto":
        why = _why_unavailable(backend, device)
        if why is not None:
            raise RuntimeError(f"backend {backend!r} cannot run on {device}: {why}")
        return backend
    if device.type == "cpu":
        return "reference"
    if device.type == "cuda":
        from guidance_kernels.backends.dispatch import measured_choice

        name = torch.cuda.get_device_name(device)
        choice = measured_choice(name, shape_class)
        if choice is not None and choice in _LAZY and _why_unavailable(choice, device) is None:
            return choice
    best, best_rank = "reference", None
    for name in _LAZY:
        if name == "reference" or _why_unavailable(name, device) is not None:
            continue
        rank = get_backend(name).priority.get(device.type)
        if rank is not None and (best_rank is None or rank < best_rank):
            best, best_rank = name, rank
    return best
