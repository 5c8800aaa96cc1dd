"""Large CPU tensors backed by transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``).

A fresh activation-sized result (the ``dX`` of a backward, 50 MB at n = 256, p = 50,176) is first
touched by the product that fills it: with 4 KiB pages that is one page fault per 4 KiB, which
measured 16 ms of 66 ms for that ``dX = M X'`` on the 2-core CI VM; with 2 MiB pages the faults
all but vanish (PyTorch does the same for every allocation under ``THP_MEM_ALLOC_ENABLE=1``).
The advice covers the 2 MiB-aligned interior of the fresh, untouched buffer; it is only
advice: where the kernel, the platform or ``GK_NO_HUGEPAGES=1`` says no, nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
from torch import Tensor

__all__ = ["empty", "MIN_BYTES"]

_HUGE = 2 << 20  # 2 MiB
MIN_BYTES = 4 << 20  # smaller buffers are not worth a system call
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


def empty(shape, dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, contiguous, its pages advised huge when it
    is at least :data:`MIN_BYTES` (before anything touches it)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    fn = _madvise()
    if fn is not None and nbytes >= MIN_BYTES:
        start = -(-t.data_ptr() // _HUGE) * _HUGE
        end = (t.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            fn(start, end - start, _MADV_HUGEPAGE)  # advice: a refusal (EINVAL) changes nothing
    return t
