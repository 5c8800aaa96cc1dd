"""Helpers shared by the tests and ``scripts/cuda_memcheck_driver.py``: fp64 conversions, the
row-shifted and centered activations every expectation is built from, the "awkward layers" set
and the backends available here. Tolerances live in ``tolerance.py``."""

from __future__ import annotations

import torch

try:  # scripts/cuda_memcheck_driver.py imports this module where pytest may be absent
    import pytest
except ImportError:  # pragma: no cover
    pytest = None
from torch import Tensor

from tolerance import rel  # noqa: F401 - re-exported: one relative error for every test

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fp64(t: Tensor) -> Tensor:
    """``t`` detached, in fp64."""
    return t.detach().double()


def shifted(t: Tensor) -> Tensor:
    """fp64 ``t - 1 t[0]`` (each sample minus the first one), differentiable (no detach): what
    every backend product is of (``docs/design.md``, row-shifted products)."""
    t = t.double()
    return t - t[:1]


def sh(t: Tensor) -> Tensor:
    """:func:`shifted` of ``t`` detached."""
    return shifted(t.detach())


def centered(t: Tensor) -> Tensor:
    """fp64 ``t - 1 mean(t)``, differentiable: what the ops' centered outputs are built from."""
    t = t.double()
    return t - t.mean(0, keepdim=True)


def rel_or_abs(got: Tensor, want: Tensor) -> float:
    """Frobenius error relative to ``||want||``, or absolute when ``want`` is zero (an output
    that must be exactly zero)."""
    got, want = got.double(), want.double()
    den = want.norm().item()
    err = (got - want).norm().item()
    return err / den if den > 0 else err


def awkward_layers(dtype: torch.dtype, g: torch.Generator, device, big: bool = True) -> list[Tensor]:
    """Awkward layers: odd n and p, n = 1, p = 1, one full 64-tile, just over a tile, empty
    features, zero rows, non-contiguous views (column-strided, row-sliced with odd row stride,
    storage offset making the base unaligned) and a large common offset (x' exact in bf16/fp16,
    so 16-bit kernels skip their lo products). ``big`` adds a (130, 1000) layer after the
    tile-sized ones and a long (96, 70001) layer at the end that forces split-K (the GPU tests;
    the sanitizer driver adds its own long layers)."""
    r = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
    out = [r(33, 200), r(1, 37), r(17, 1), r(64, 64), r(65, 129)]
    if big:
        out.append(r(130, 1000))
    out += [
        r(5, 0),
        r(0, 7),
        r(40, 19).T,  # (19, 40), column stride 19
        r(21, 90)[:, ::3],  # (21, 30), column stride 3
        r(50, 77)[3:40, 1:70],  # (37, 69), odd row stride 77 (scalar loads)
        r(50, 80)[2:39, 1:70],  # (37, 69), row stride 80 but base not 16-byte aligned
        (torch.randn(48, 257, device=device, generator=g) * 0.01 + 3.0).to(dtype),
    ]
    if big:
        out.append(r(96, 70_001))  # many K splits (atomics)
    return out


def backend_params() -> list:
    """``pytest.param`` per backend name, each skipped (with the reason) where it cannot run on
    this machine's device: reference always; triton (under ``TRITON_INTERPRET=1`` on CPU, set by
    conftest); cuda with the built extension and a GPU."""
    from guidance_kernels.backends import get_backend, list_backends

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = []
    for name in list_backends():
        try:
            why = get_backend(name).available(dev)
        except Exception as e:  # noqa: BLE001 - an import failure is a reason to skip
            why = f"{type(e).__name__}: {e}"
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- exact bounds, CPU-sized layers
def close(got, want, scale, dtype, k, c=2.0, msg=""):
    """``got`` vs the fp64 ``want`` entry by entry, within the rounding bound of ``k``-term sums
    accumulated in fp32 (fp64 for fp64 input) of operands rounded once to ``dtype`` (the row
    shift of low-precision input), ``scale`` the ``Σ|terms|`` per entry (tests/tolerance.py)."""
    from tolerance import assert_entrywise

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_entrywise(got, want, scale, k=k, input_dtype=dtype, acc_dtype=acc, c=c, msg=msg)


def products(X, Y):
    """The five feature-space products of shifted fp64 ``X``, ``Y`` with their ``Σ|terms|``."""
    from tolerance import abs_product

    return [(X.T @ X, abs_product(X.T, X)), (Y.T @ Y, abs_product(Y.T, Y)), (X.T @ Y, abs_product(X.T, Y)),
            (X.sum(0), X.abs().sum(0)), (Y.sum(0), Y.abs().sum(0))]


def small_layers(dtype, seed=0, dev=None):
    """CPU-sized layers of different feature sizes: odd n and p, n = 2, p = 1, and three
    non-contiguous views (transposed, column-strided, row-sliced); some with a common offset."""
    dev = dev or device()
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, off=0.0: (torch.randn(*s, generator=g) + off).to(dtype).to(dev)  # noqa: E731
    return [
        r(33, 100, off=3.0),
        r(5, 37),
        r(2, 3, off=-2.0),
        r(17, 1),
        r(40, 19, off=1.5).T,  # (19, 40), feature stride != 1
        r(21, 90)[:, ::3],  # (21, 30), feature stride 3
        r(50, 64, off=-4.0)[7:38],  # (31, 64), storage offset
    ]


def partners(xs, dtype, seed=1, dev=None):
    """Guides for :func:`small_layers`: same n, other feature sizes and offsets."""
    dev = dev or device()
    g = torch.Generator().manual_seed(seed)
    qs = [11, 50, 4, 23, 33, 9, 64]
    offs = [1.0, -3.0, 0.0, 2.0, 0.0, 5.0, 0.0]
    return [(torch.randn(x.shape[0], q, generator=g) + o).to(dtype).to(dev) for x, q, o in zip(xs, qs, offs)]


# Triton launch parameters for CPU-sized layers: several tiles per layer, and split-K (SPLIT) or
# not (DIRECT)
TRITON_SMALL = dict(fwd_block=16, fwd_bk=16, bwd_bm=16, bwd_bn=16, bwd_bk=16)
TRITON_SPLIT = dict(TRITON_SMALL, min_chunk=16, target_items=1 << 20)
TRITON_DIRECT = dict(TRITON_SMALL, min_chunk=1 << 20, target_items=1)


def triton_or_skip():
    """The Triton backend module, or skip (no triton, or not available on this device)."""
    pytest.importorskip("triton")
    from guidance_kernels.backends import get_backend

    why = get_backend("triton").available(torch.device(device()))
    if why is not None:
        pytest.skip(why)
    from guidance_kernels.backends import triton as tb

    return tb


def cuda_prod_tol(k, dtype=torch.float32):
    """Relative Frobenius error vs fp64 of the same (rounded) inputs for ``k``-term fp32 sums
    (tests/tolerance.py: ``frob_bound``); ``dtype`` adds one rounding to it (a low-precision row
    shift, or a backward's output rounded to the activation dtype)."""
    from tolerance import frob_bound

    return frob_bound(dtype, k)


def cuda_ready():
    """A skip mark for tests that run the CUDA extension's kernels."""
    from guidance_kernels.backends import cuda as cb

    return pytest.mark.skipif(
        cb._C is None or not torch.cuda.is_available() or cb.available(torch.device("cuda")) is not None,
        reason="needs the built extension and an sm_80+ CUDA device",
    )
