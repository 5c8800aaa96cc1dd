"""CUDA C++ backend: the compiled extension ``guidance_kernels._C`` (sources in ``csrc/``).

One grouped launch per call and dtype for every layer (see :mod:`guidance_kernels.backends` for
the contract). Every product is of the row-shifted activation ``x' = x - 1 x[0]``; the kernels
subtract the first sample in fp32 while loading tiles (no copy of the activation, no extra pass):

* ``gram`` / ``cross``: a zero-fill launch (only when some product's reduction is split) and one
  tensor-core kernel over a work list of ``(product, 64x64 output tile, K range)`` items;
  symmetric products list only the upper tiles and mirror them. bf16/fp16: ``x'`` is split into
  bf16 hi + lo (≈16 significant bits) and multiplied with up to three bf16 WMMA 16x16x16 products
  (fp32 accumulation; the lo products are skipped where ``x'`` is exact in bf16); fp32 uses
  3xTF32 on ``x'`` (≈ fp32 accuracy).
* ``gram_backward`` / ``cross_backward``: one kernel, one 64x64 output tile per block, 3xTF32
  (both operands split into two TF32 halves) so the result is ≈ fp32-accurate before the final
  rounding to the activation dtype.

The host never syncs with the device; the per-call descriptor table goes host->device from
pinned memory with ``non_blocking=True``. Split-K sums use fp32 atomics, so results may differ in
the last bits from run to run. float64 inputs (verification only) go to the reference backend;
a list mixing dtypes is split into one launch per dtype; a pair ``(x, y)`` of two different
dtypes is computed in fp32 (an upcast copy of both).

When the extension is missing (not built, or built against another torch) the backend still
registers, and :func:`available` says why, so ``backend="cuda"`` fails with that reason.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from guidance_kernels.backends import Backend, register_backend
from guidance_kernels.backends import reference as _ref
from guidance_kernels.planning import group_by

_log = logging.getLogger(__name__)

_BUILD_HINT = (
    "it is built at install time when nvcc and a CUDA build of torch are present: "
    "`pip install --no-build-isolation -e .` (set GUIDANCE_KERNELS_FORCE_BUILD=1 to turn a "
    "skipped build into an error; see docs/cuda.md)"
)

try:
    from guidance_kernels import _C  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except ModuleNotFoundError as e:
    _C = None
    if e.name in ("guidance_kernels._C", None):
        _IMPORT_ERROR = f"the CUDA extension guidance_kernels._C is not built; {_BUILD_HINT}"
    else:
        _IMPORT_ERROR = f"the CUDA extension guidance_kernels._C failed to import ({e})"
except ImportError as e:  # e.g. built against another torch: undefined symbols
    _C = None
    _IMPORT_ERROR = (
        f"the CUDA extension guidance_kernels._C failed to import ({e}); rebuild it against the "
        f"installed torch {torch.__version__}: {_BUILD_HINT}"
    )


def _stale_reason(ext) -> Optional[str]:
    """Why ``ext`` must not be used, or None. An extension built from sources older than the
    row-shifted product contract computes products of the raw activation: silently wrong, so it
    is refused until rebuilt (an editable install keeps the old ``.so`` until then)."""
    if not getattr(ext, "ROW_SHIFTED", False):
        return (
            "the CUDA extension guidance_kernels._C is stale (built before the row-shifted "
            f"product contract x' = x - x[0]); rebuild it: {_BUILD_HINT}"
        )
    return None


if _C is not None and _stale_reason(_C) is not None:
    _IMPORT_ERROR = _stale_reason(_C)
    _C = None

if _IMPORT_ERROR is not None and torch.cuda.is_available():
    # Said once per process, where a GPU user would otherwise silently lose the fast path.
    _log.warning("guidance_kernels: CUDA backend unavailable: %s", _IMPORT_ERROR)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)
_device_reason: dict = {}


def available(device: torch.device) -> Optional[str]:
    """None if the CUDA kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, not on {device.type!r} tensors"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA device or driver)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_reason:
        cap = torch.cuda.get_device_capability(index)
        _device_reason[index] = (
            None
            if cap >= _MIN_CAPABILITY
            else f"{torch.cuda.get_device_name(index)} has compute capability {cap[0]}.{cap[1]}; "
            f"the CUDA kernels need {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]}+ (bf16/TF32 tensor cores)"
        )
    return _device_reason[index]


def _ext():
    if _C is None:
        raise RuntimeError(f"backend 'cuda' is not available: {_IMPORT_ERROR}")
    return _C


def _act(x: Tensor) -> Tensor:
    """An activation as the kernels take it: unit column stride, non-overlapping rows."""
    if x.dim() == 2 and x.size(1) > 1 and x.stride(1) != 1:
        return x.contiguous()
    if x.dim() == 2 and x.size(0) > 1 and x.stride(0) < x.size(1):
        return x.contiguous()
    return x


def _f32(m: Tensor) -> Tensor:
    return m.to(torch.float32).contiguous()


def _is_ref(t: Tensor) -> bool:
    return t.dtype == torch.float64 or t.dtype not in _SUPPORTED


# --------------------------------------------------------------------------- primitives
def gram(xs: list[Tensor]) -> list[Tensor]:
    out: list = [None] * len(xs)
    for dt, idx in group_by([x.dtype for x in xs]).items():
        sub = [xs[i] for i in idx]
        res = _ref.gram(sub) if _is_ref(sub[0]) else _ext().gram([_act(x) for x in sub])
        for i, r in zip(idx, res):
            out[i] = r
    return out


def gram_backward(ms: list[Tensor], xs: list[Tensor]) -> list[Tensor]:
    out: list = [None] * len(xs)
    for dt, idx in group_by([x.dtype for x in xs]).items():
        sx, sm = [xs[i] for i in idx], [ms[i] for i in idx]
        if _is_ref(sx[0]):
            res = _ref.gram_backward(sm, sx)
        else:
            res = _ext().gram_backward([_f32(m) for m in sm], [_act(x) for x in sx])
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _pair_dtype(x: Tensor, y: Tensor) -> Optional[torch.dtype]:
    """The kernel dtype for a pair, or None for the reference backend (float64 involved)."""
    if _is_ref(x) or _is_ref(y):
        return None
    return x.dtype if x.dtype == y.dtype else torch.float32


def cross(xs: list[Tensor], ys: list[Tensor]):
    outs: list = [[None] * len(xs) for _ in range(5)]
    for dt, idx in group_by([_pair_dtype(x, y) for x, y in zip(xs, ys)]).items():
        sx, sy = [xs[i] for i in idx], [ys[i] for i in idx]
        if dt is None:
            res = _ref.cross(sx, sy)
        else:
            res = _ext().cross([_act(x.to(dt)) for x in sx], [_act(y.to(dt)) for y in sy])
        for k in range(5):
            for i, r in zip(idx, res[k]):
                outs[k][i] = r
    return tuple(outs)


def cross_backward(xs, ms, ys, ns, vs) -> list[Tensor]:
    out: list = [None] * len(xs)
    for dt, idx in group_by([_pair_dtype(x, y) for x, y in zip(xs, ys)]).items():
        sx, sm, sy, sn, sv = ([t[i] for i in idx] for t in (xs, ms, ys, ns, vs))
        if dt is None:
            res = _ref.cross_backward(sx, sm, sy, sn, sv)
        else:
            res = _ext().cross_backward(
                [_act(x.to(dt)) for x in sx],
                [_f32(m) for m in sm],
                [_act(y.to(dt)) for y in sy],
                [_f32(n) for n in sn],
                [_f32(v) for v in sv],
            )
            res = [r.to(x.dtype) for r, x in zip(res, sx)]  # a no-op unless the pair was upcast
        for i, r in zip(idx, res):
            out[i] = r
    return out


register_backend(
    Backend(
        name="cuda",
        gram=gram,
        gram_backward=gram_backward,
        cross=cross,
        cross_backward=cross_backward,
        available=available,
        # backend="auto" prefers the lowest number: after triton (10) until GPU measurements
        # (bench/results/) say otherwise.
        priority={"cuda": 20},
    )
)
