"""Large CPU buffers (backends/cpu_pages.py, csrc/cpu/pool.cpp): the block cache reuses a dead
tensor's block for the next request of its size class, keeps at most its limit (least recently
released first out), can be emptied and switched off; without it, plain tensors advised huge."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from guidance_kernels.backends import cpu_pages

F32, F64 = torch.float32, torch.float64
MIB = 1 << 20
needs_pool = pytest.mark.skipif(cpu_pages._pool() is None, reason="guidance_kernels._cpu not built")


@pytest.fixture
def cache():
    """A clean cache with the default limit; restores the limit and empties it afterwards."""
    before = cpu_pages.cache_limit()
    cpu_pages.empty_cache()
    cpu_pages.set_cache_limit(cpu_pages.DEFAULT_CACHE_BYTES)
    yield
    cpu_pages.empty_cache()
    cpu_pages.set_cache_limit(before)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


@pytest.mark.parametrize("limit", [None, 0])
def test_buffers_are_plain_contiguous_tensors(limit, cache):
    """From the cache or not: the shape and dtype asked for, contiguous, writable, independent."""
    if limit is not None:
        cpu_pages.set_cache_limit(limit)
    a = cpu_pages.empty((512, 4096), F32)  # 8 MiB: above MIN_BYTES
    b = cpu_pages.empty([3, 512, 1024], F64)
    assert a.shape == (512, 4096) and a.dtype == F32 and a.is_contiguous() and a.device.type == "cpu"
    assert b.shape == (3, 512, 1024) and b.dtype == F64
    a.fill_(3.0)
    b.fill_(-1.0)
    assert float(a.sum()) == 3.0 * a.numel() and float(b.sum()) == -b.numel()
    small = cpu_pages.empty(3, F64)
    assert small.shape == (3,) and small.dtype == F64


@needs_pool
def test_a_dead_tensors_block_is_reused_for_its_size_class(cache):
    a = cpu_pages.empty((1536, 1024), F32)  # 6 MiB
    ptr = a.data_ptr()
    assert ptr % (2 * MIB) == 0
    del a
    info = cpu_pages.cache_info()
    assert info["cached_bytes"] == 6 * MIB and info["cached_blocks"] == 1
    b = cpu_pages.empty((1500, 1040), F32)  # 5.95 MiB: the same 6 MiB class
    assert b.data_ptr() == ptr and cpu_pages.cache_info()["hits"] == info["hits"] + 1
    c = cpu_pages.empty((1536, 1024), F32)  # b is alive: a fresh block
    assert c.data_ptr() != ptr and cpu_pages.cache_info()["cached_bytes"] == 0


@needs_pool
def test_the_limit_evicts_least_recently_released_first(cache):
    cpu_pages.set_cache_limit(8 * MIB)
    a, b, c = (cpu_pages.empty((1024, 1024), F32) for _ in range(3))
    pa, pb, pc = a.data_ptr(), b.data_ptr(), c.data_ptr()
    del a, b, c  # released in order a, b, c: a is evicted
    assert cpu_pages.cache_info()["cached_bytes"] == 8 * MIB
    got = cpu_pages.empty((1024, 1024), F32).data_ptr()
    assert got in {pb, pc} and got != pa
    big = cpu_pages.empty((4096, 1024), F32)  # 16 MiB > limit: freed on release, not cached
    del big
    assert cpu_pages.cache_info()["cached_bytes"] <= 8 * MIB
    cpu_pages.set_cache_limit(4 * MIB)  # lowering the limit trims at once
    assert cpu_pages.cache_info()["cached_bytes"] <= 4 * MIB
    cpu_pages.empty_cache()
    assert cpu_pages.cache_info()["cached_bytes"] == 0 and cpu_pages.cache_info()["cached_blocks"] == 0


@needs_pool
def test_off_means_no_cache_and_a_tensor_dying_in_another_thread_returns_its_block(cache):
    cpu_pages.set_cache_limit(0)
    misses = cpu_pages.cache_info()["misses"]
    t = cpu_pages.empty((1024, 1024), F32)
    del t
    assert cpu_pages.cache_info()["misses"] == misses and cpu_pages.cache_info()["cached_bytes"] == 0
    cpu_pages.set_cache_limit(cpu_pages.DEFAULT_CACHE_BYTES)
    box = [cpu_pages.empty((1024, 1024), F32)]
    ptr = box[0].data_ptr()
    th = threading.Thread(target=box.clear)
    th.start()
    th.join()
    assert cpu_pages.cache_info()["cached_blocks"] == 1
    assert cpu_pages.empty((1024, 1024), F32).data_ptr() == ptr


@needs_pool
def test_gradients_come_from_the_cache_and_autograd_keeps_them_without_a_copy(cache):
    """A backward's ``dX`` is a cached block; autograd steals it as ``.grad`` (no clone), and the
    next step reuses it once ``.grad`` is dropped."""
    import guidance_kernels as gk

    x = torch.randn(64, 20000, requires_grad=True)  # dX: 4.9 MiB
    y = torch.randn(64, 300)
    gk.guidance_loss([x], [y]).backward()
    ptr = x.grad.data_ptr()
    assert ptr % (2 * MIB) == 0
    x.grad = None
    hits = cpu_pages.cache_info()["hits"]
    gk.guidance_loss([x], [y]).backward()
    assert x.grad.data_ptr() == ptr and cpu_pages.cache_info()["hits"] > hits


def test_the_environment_sets_the_limit_and_bad_values_are_named():
    code = "from guidance_kernels.backends import cpu_pages as c; print(c.cache_limit())"
    if cpu_pages._pool() is not None:
        out = _run(code, GK_CPU_CACHE_BYTES="12345678")
        assert out.returncode == 0 and out.stdout.strip() == "12345678"
        out = _run(code, GK_CPU_CACHE_BYTES="0")
        assert out.returncode == 0 and out.stdout.strip() == "0"
        out = _run(code, GK_CPU_CACHE_BYTES="1GB")
        assert out.returncode != 0 and "GK_CPU_CACHE_BYTES" in out.stderr and "'1GB'" in out.stderr
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="nbytes"):
            cpu_pages.set_cache_limit(bad)


def test_huge_page_advice_switches_off():
    code = "from guidance_kernels.backends import cpu_pages; print(cpu_pages._madvise() is None)"
    out = _run(code, GK_NO_HUGEPAGES="1")
    assert out.returncode == 0 and out.stdout.strip() == "True"
