"""The CPU extension's CKA statistics (csrc/cpu/gram_stats.cpp via backends/cpu_stats.py) against
the torch formulation: the forward within fp64 rounding of the exact sums, the backward bit for
bit (the same fp64 operations in the same order; the build forbids contraction), NaN-poisoned
outputs, the routing (fp32 CPU stacks, not under ``create_graph``) and argument errors."""

import os
import subprocess
import sys

import pytest
import torch

from guidance_kernels import metrics, ops
from guidance_kernels.backends import cpu_stats
from helpers import close

F32, F64 = torch.float32, torch.float64
needs_kernel = pytest.mark.skipif(cpu_stats._module() is None, reason="guidance_kernels._cpu not built or GK_NO_CPU_KERNEL set")


def _stacks(P: int, n: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, n, n + 3, generator=g)
    k = x @ x.mT * scale
    l = (torch.randn(P, n, n, generator=g) + 5.0) * scale
    return k.contiguous(), l.contiguous()


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 8, 9, 33, 200])
@pytest.mark.parametrize("scale", [1.0, 1e18, 1e-18])
def test_forward_matches_the_exact_fp64_sums(n, scale):
    """fp32 products would overflow (1e18) or underflow (1e-18): the kernel multiplies in fp64."""
    k, l = _stacks(3, n, n, scale)
    got = torch.full((3, 5), float("nan"), dtype=F64)
    cpu_stats._module().gram_stats_(k, l, got)
    close(got, metrics.gram_stats(k, l), metrics.gram_stats(k.abs(), l.abs()), F64, k=n * n)
    assert torch.equal(cpu_stats.gram_stats(k, l), got)


@needs_kernel
@pytest.mark.parametrize("n", [1, 9, 64])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_backward_is_the_torch_formulation_bit_for_bit(n, need):
    k, l = _stacks(4, n, 100 + n)
    g = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(n))
    g[0] *= 1e30  # d CKA / d ΣK∘K of tiny Grams: fp64 range
    dk, dl = torch.full_like(k, float("nan")), torch.full_like(l, float("nan"))
    cpu_stats._module().gram_stats_backward_(g, k, l, dk if need[0] else torch.empty(0), dl if need[1] else torch.empty(0))
    wk, wl = cpu_stats.torch_backward(g, k, l, *need)
    for got, want, on in ((dk, wk, need[0]), (dl, wl, need[1])):
        if on:
            assert torch.equal(got, want)
        else:
            assert want is None and bool(got.isnan().all())  # not asked: not written
    with torch.no_grad():
        fk, fl = cpu_stats.gram_stats_backward(g, k, l, *need)
    assert (fk is None) != need[0] and (fl is None) != need[1]


@needs_kernel
def test_routing_through_the_op(monkeypatch):
    """fp32 CPU stacks use the kernel in the forward and in a plain backward; fp64 stacks and
    ``create_graph`` keep the torch formulation (double backward works)."""
    calls = []
    real = cpu_stats._module()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(cpu_stats, "_module", lambda: Spy())
    k, l = _stacks(2, 12, 7)
    k.requires_grad_()
    st = ops.gram_stats(k, l, "reference")
    (gk,) = torch.autograd.grad(st.sum(), k)
    assert calls == ["gram_stats_", "gram_stats_backward_"]
    calls.clear()
    st = ops.gram_stats(k, l, "reference")
    (gk2,) = torch.autograd.grad(st.sum(), k, create_graph=True)
    assert calls == ["gram_stats_"] and gk2.grad_fn is not None and torch.equal(gk, gk2.detach())
    calls.clear()
    kd = k.detach().double().requires_grad_()
    torch.autograd.grad(ops.gram_stats(kd, l.double(), "reference").sum(), kd)
    assert calls == []
    assert not cpu_stats.available(k.detach().mT, l) and not cpu_stats.available(k.detach()[None], l)


@needs_kernel
def test_bad_arguments_name_the_function():
    m = cpu_stats._module()
    k, l = _stacks(2, 5, 1)
    with pytest.raises(RuntimeError, match="gram_stats: l must be a contiguous float32"):
        m.gram_stats_(k, l.double(), torch.empty(2, 5, dtype=F64))
    with pytest.raises(RuntimeError, match="gram_stats: out must be"):
        m.gram_stats_(k, l, torch.empty(2, 5))
    with pytest.raises(RuntimeError, match="gram_stats: g must be"):
        m.gram_stats_backward_(torch.empty(3, 5, dtype=F64), k, l, torch.empty_like(k), torch.empty(0))
    with pytest.raises(RuntimeError, match="gram_stats: dk must be"):
        m.gram_stats_backward_(torch.empty(2, 5, dtype=F64), k, l, torch.empty(2, 5, 4), torch.empty(0))


def test_the_switch_turns_it_off():
    code = "from guidance_kernels.backends import cpu_stats; print(cpu_stats._module() is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "GK_NO_CPU_KERNEL": "1"}, check=True)
    assert out.stdout.strip() == "True"
