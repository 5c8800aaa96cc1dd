"""Large CPU tensors whose pages are already mapped: a cache of blocks, else huge-page advice.

A fresh activation-sized result (the ``dX`` of a backward, 50 MB at n = 256, p = 50,176) is first
touched by the product that fills it, and every first touch of a page faults (the kernel zeroes
the page). On the 2-core CI VM that was ~40 ms of the 420 ms ``guidance_loss`` fwd+bwd of
``bench/cpu_targets.py``, every step, because blocks that large go back to the OS when freed.

* With the CPU extension (``guidance_kernels._cpu``, ``csrc/cpu/pool.cpp``): :func:`empty` returns
  a tensor whose 2 MiB-aligned block (size rounded up to 2 MiB) returns to a cache when the tensor
  dies; the next request of the same size class reuses it, its pages mapped. The cache keeps at
  most :func:`cache_limit` bytes (least recently released first out; default 1 GiB, or
  ``GK_CPU_CACHE_BYTES`` at import; 0 turns it off). Like PyTorch's CUDA caching allocator, the
  process then holds that memory: :func:`empty_cache` frees it, :func:`cache_info` reports it.
* Without it: a plain ``torch.empty`` whose 2 MiB-aligned interior is advised huge (Linux
  ``madvise(MADV_HUGEPAGE)``), which cuts the faults by 512x but not the zeroing.
  ``GK_NO_HUGEPAGES=1`` turns the advice off.

Only for buffers of at least :data:`MIN_BYTES`; smaller ones are ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
from torch import Tensor

__all__ = ["empty", "MIN_BYTES", "DEFAULT_CACHE_BYTES", "cache_info", "cache_limit", "set_cache_limit", "empty_cache"]

_HUGE = 2 << 20  # 2 MiB
MIN_BYTES = 4 << 20  # smaller buffers are not worth a system call or a cache entry
DEFAULT_CACHE_BYTES = 1 << 30
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux") or os.environ.get("GK_NO_HUGEPAGES", "") not in ("", "0"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _limit_from_env() -> int:
    raw = os.environ.get("GK_CPU_CACHE_BYTES", "")
    if raw == "":
        return DEFAULT_CACHE_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"GK_CPU_CACHE_BYTES must be a whole number of bytes (0 turns the cache off), got {raw!r}")
    if value < 0:
        raise ValueError(f"GK_CPU_CACHE_BYTES must be >= 0, got {value}")
    return value


@functools.lru_cache(maxsize=None)
def _pool():
    """The extension module with its cache limit set, or None when the extension is not built."""
    try:
        from guidance_kernels import _cpu
    except ImportError:
        return None
    _cpu.pool_set_limit(_limit_from_env())
    return _cpu


def cache_limit() -> int:
    """Most bytes the block cache keeps (0 when it is off or the extension is not built)."""
    mod = _pool()
    return 0 if mod is None else mod.pool_stats()[2]


def set_cache_limit(nbytes: int) -> None:
    """Set the most bytes the block cache keeps (``0``: keep nothing; cached blocks above the new
    limit are freed at once). A no-op without the extension."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_cache_limit: nbytes must be an int >= 0, got {nbytes!r}")
    mod = _pool()
    if mod is not None:
        mod.pool_set_limit(nbytes)


def empty_cache() -> None:
    """Free every cached block (tensors alive now keep theirs and return them when they die)."""
    mod = _pool()
    if mod is not None:
        mod.pool_trim()


def cache_info() -> dict:
    """``{"cached_bytes", "cached_blocks", "limit", "hits", "misses"}`` of the block cache (all 0
    without the extension); ``hits`` / ``misses`` count the requests :func:`empty` sent to it."""
    mod = _pool()
    keys = ("cached_bytes", "cached_blocks", "limit", "hits", "misses")
    return dict(zip(keys, (0,) * 5 if mod is None else mod.pool_stats()))


def empty(shape, dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, contiguous: from the block cache when it
    is on and the tensor is at least :data:`MIN_BYTES`, else with its pages advised huge."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    if cache_limit() > 0:  # the extension is built and the cache is on
        return _pool().pooled_empty(list(shape), dtype)
    t = torch.empty(shape, dtype=dtype)
    fn = _madvise()
    if fn is not None:
        start = -(-t.data_ptr() // _HUGE) * _HUGE
        end = (t.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            fn(start, end - start, _MADV_HUGEPAGE)  # advice: a refusal (EINVAL) changes nothing
    return t
