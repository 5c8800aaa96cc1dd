"""Timing, memory and launch counting. No sizes here: callers pass the argument sets to rotate.

GPU: CUDA events around every call (one event pair per repeat, one sync at the end), after
warm-up; the argument sets rotate so the inputs of consecutive calls are different buffers whose
total is larger than L2 (the caller builds them with :func:`rotation_count`).
CPU: ``time.perf_counter`` around every call, same warm-up and rotation.
Both: repeat until ``min_reps`` calls and ``budget_s`` seconds have passed (at most ``max_reps``);
report the median and the 20th / 80th percentiles of the per-call times.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import re
import statistics
import time
from typing import Callable, Optional, Sequence

import torch


@dataclasses.dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cache_bytes(device: torch.device) -> int:
    """L2 size on CUDA (from the device properties, 50 MiB if unknown); last-level cache on CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip()
        m = re.match(r"(\d+)([KMG]?)", txt)
        mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
        return int(m.group(1)) * mult
    except Exception:  # noqa: BLE001
        return 32 << 20


def rotation_count(set_bytes: int, device: torch.device, max_sets: int = 8, max_total: int = 8 << 30) -> int:
    """How many distinct argument sets to rotate so that their total exceeds twice the cache."""
    want = math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))
    fit = max(1, max_total // max(set_bytes, 1))
    return int(max(1, min(want, max_sets, fit)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable,
    arg_sets: Sequence[tuple],
    device: torch.device,
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 100,
    budget_s: float = 1.0,
) -> Timing:
    """Time ``fn(*arg_sets[i % len(arg_sets)])``; see the module docstring."""
    k = len(arg_sets)
    for i in range(warmup):
        fn(*arg_sets[i % k])
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        # Calibrate the number of repeats from one timed call, then launch them all back to back.
        t0 = time.perf_counter()
        fn(*arg_sets[0])
        sync(device)
        one = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(max_reps, max(min_reps, budget_s / one)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(*arg_sets[i % k])
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        t_start = time.perf_counter()
        i = 0
        while i < max_reps and (i < min_reps or time.perf_counter() - t_start < budget_s):
            t0 = time.perf_counter()
            fn(*arg_sets[i % k])
            times.append(time.perf_counter() - t0)
            i += 1
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


# --------------------------------------------------------------------------- memory
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _mallopt(threshold: int) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap, and trim the heap above twice
    that (glibc's own dynamic rule, made fixed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except Exception:  # noqa: BLE001
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field}:\s+(\d+)", f.read())
    return int(m.group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except Exception:  # noqa: BLE001
        return False


def peak_extra_bytes(fn: Callable, args: tuple, device: torch.device) -> tuple[Optional[int], object]:
    """Peak memory allocated during one call beyond what was allocated before it.

    CUDA: the caching allocator's peak (``max_memory_allocated`` after a reset) minus the
    allocation before the call. CPU (Linux): the peak resident set size during the call (VmHWM,
    reset through ``/proc/self/clear_refs``) minus the resident size before it, with glibc told
    to serve every allocation of 64 KiB or more by ``mmap`` so that freed buffers leave the
    resident set; approximate (page granularity, allocator slack). ``None`` where unmeasurable.
    Returns ``(bytes or None, fn's output)``.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn(*args)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return max(0, peak - before), out
    if device.type != "cpu" or not _mallopt(64 << 10):
        return None, fn(*args)
    try:
        if not _reset_hwm():
            return None, fn(*args)
        before = _rss_kib("VmRSS")
        _reset_hwm()
        out = fn(*args)
        peak = _rss_kib("VmHWM")
        return max(0, peak - before) * 1024, out
    finally:
        # Back to a large threshold (near glibc's dynamic steady state) for the timing loops.
        _mallopt(32 << 20)


# --------------------------------------------------------------------------- launches
def count_launches(fn: Callable, args: tuple, device: torch.device) -> Optional[int]:
    """GPU kernels launched by one call (torch.profiler); ``None`` on CPU or if unavailable."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args)
            sync(device)
        n = 0
        for evt in prof.events():
            if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA and not evt.name.startswith(
                ("Memcpy", "Memset")
            ):
                n += 1
        return n
    except Exception:  # noqa: BLE001
        return None

