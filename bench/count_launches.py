"""Count the kernel-launching aten ops of one ``guidance_loss`` forward and backward, as a
function of the number of layer pairs L (a CPU proxy for GPU launches: the Triton kernels run
under TRITON_INTERPRET=1 and are not aten ops, so add their 1-3 launches per direction).

    TRITON_INTERPRET=1 python bench/count_launches.py [--backend triton] [--n 64] [--p 64]

The interpreter's copies of kernel arguments (``copy_``) are included in the counts.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import guidance_kernels as gk

# aten ops that launch no kernel (views, metadata, allocation, no-op casts)
NO_LAUNCH = {
    "aten::view", "aten::as_strided", "aten::reshape", "aten::t", "aten::transpose", "aten::expand",
    "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::permute", "aten::diagonal",
    "aten::detach", "aten::detach_", "aten::alias", "aten::empty", "aten::empty_strided",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::lift_fresh", "aten::unbind",
    "aten::flatten", "aten::mT", "aten::result_type", "aten::contiguous", "aten::empty_like",
    "aten::split", "aten::narrow", "aten::_reshape_alias", "aten::to", "aten::promote_types",
    "aten::set_", "aten::new_empty", "aten::_to_copy", "aten::is_pinned", "aten::pin_memory",
    "aten::_pin_memory",
}


def launches(prof) -> collections.Counter:
    """Leaf aten ops that launch a kernel, by name."""
    c: collections.Counter = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in NO_LAUNCH:
            continue
        if any(k.name.startswith("aten::") and k.name not in NO_LAUNCH for k in e.cpu_children):
            continue
        c[e.name] += 1
    return c


def count(L: int, n: int, p: int, form: str, metric: str, backend: str) -> tuple[int, int]:
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(n, p, generator=g).requires_grad_() for _ in range(L)]
    ys = [torch.randn(n, p, generator=g) for _ in range(L)]
    xs = [x * 1 for x in leaves]  # non-leaf activations, as in a model
    with profile(activities=[ProfilerActivity.CPU]) as pf:
        loss = gk.guidance_loss(xs, ys, backend=backend, form=form, metric=metric)
    with profile(activities=[ProfilerActivity.CPU]) as pb:
        torch.autograd.grad(loss, xs)
    return sum(launches(pf).values()), sum(launches(pb).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--p", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    a = ap.parse_args()
    for metric, form in (("cka", "sample"), ("cka", "feature"), ("debiased_cka", "sample")):
        for L in a.layers:
            f, b = count(L, a.n, a.p, form, metric, a.backend)
            print(f"{metric:12s} {form:8s} L={L:4d}: forward {f:4d}  backward {b:4d}", flush=True)


if __name__ == "__main__":
    main()
