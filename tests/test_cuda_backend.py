"""CUDA C++ backend (``guidance_kernels._C``, sources in ``csrc/``).

Without a GPU (CI, the dev box) these tests check what can be checked on a CPU:
* the extension was built by ``pip install`` wherever nvcc and a CUDA torch are present, and it
  imports (CI installs from a fresh clone, so a compile error fails the install itself);
* the host API rejects CPU tensors, bad dtypes, bad ranks/shapes/strides and mismatched lists
  with a clear message, before touching the device;
* ``backend="cuda"`` on CPU tensors says clearly why it cannot run;
* the Python glue (dtype grouping, fp64 -> reference, stride fixes, mixed-dtype pairs, result
  order) is right, run against a fake extension that computes with the reference backend, also
  through the torch.library ops (autograd, opcheck).
The ``gpu`` tests run the kernels: every primitive on awkward shapes (odd sizes, n = 1, p = 1,
empty, strided views, split-K and unsplit, a large common offset) and the canonical workloads
W1-W5 (``bench/workloads.py``) at full size, against fp64 in value and gradient, for float32, float16 and
bfloat16, plus fp32 CKA of deep-MLP activations with a large common offset vs fp64.
Every product is of the row-shifted activation ``x' = x - 1 x[0]`` (backend contract), so the
expected values are fp64 products of ``shifted(x)``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import ops
from guidance_kernels.backends import cuda as cb
from guidance_kernels.backends import get_backend, resolve_backend
from guidance_kernels.backends import reference as ref
from guidance_kernels.planning import acc_dtype

from tolerance import frob_bound, rel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def prod_tol(k, dtype=torch.float32):
    """Relative Frobenius error vs fp64 of the same (rounded) inputs for ``k``-term fp32 sums
    (tests/tolerance.py: ``frob_bound``); ``dtype`` adds one rounding to it (a low-precision row
    shift, or a backward's output rounded to the activation dtype)."""
    return frob_bound(dtype, k)


def fp64(t):
    return t.detach().double()


def shifted(t):
    """fp64 ``t - 1 t[0]`` (each sample minus the first one), differentiable (no detach)."""
    t = t.double()
    return t - t[:1]


def centered(t):
    """fp64 ``t - 1 mean(t)``, differentiable: what the ops (centered outputs) are built from."""
    t = t.double()
    return t - t.mean(0, keepdim=True)


def _toolchain_present() -> bool:
    return torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    )


needs_ext = pytest.mark.skipif(cb._C is None, reason=f"extension not importable: {cb._IMPORT_ERROR}")


# =========================================================================== CPU: build/import
def test_extension_built_where_toolchain_present():
    """CI's compile check, second half: `pip install --no-build-isolation -e .` compiles csrc/
    (a compile error fails the install); here we make sure the build was not silently skipped."""
    if os.environ.get("GUIDANCE_KERNELS_SKIP_CUDA_BUILD", "").lower() in ("1", "true", "yes", "on"):
        pytest.skip("GUIDANCE_KERNELS_SKIP_CUDA_BUILD is set")
    if not _toolchain_present():
        pytest.skip("no nvcc / CPU-only torch: the extension is not expected here")
    assert cb._C is not None, cb._IMPORT_ERROR
    assert cb._IMPORT_ERROR is None
    assert cb._C.ROW_SHIFTED is True
    for name in ("gram", "gram_backward", "cross", "cross_backward"):
        assert callable(getattr(cb._C, name))


def test_backend_registered_and_ranked():
    b = get_backend("cuda")
    assert b.name == "cuda" and b.priority == {"cuda": 20}
    assert b.gram is cb.gram and b.cross_backward is cb.cross_backward


def test_backend_cuda_on_cpu_tensors_says_why():
    x = torch.randn(4, 8)
    why = get_backend("cuda").available(x.device)
    assert isinstance(why, str) and why
    if cb._C is None:
        assert "guidance_kernels._C" in why
    else:
        assert "CUDA tensors" in why and "'cpu'" in why
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on cpu"):
        resolve_backend("cuda", [x])
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on cpu"):
        gk.guidance_loss([x], [torch.randn(4, 5)], backend="cuda")
    assert resolve_backend("auto", [x]) == "reference"


def test_stale_extension_refused():
    """An extension built from sources older than the row-shifted contract is refused."""

    class Old:  # the old module: the four functions, no ROW_SHIFTED marker
        gram = gram_backward = cross = cross_backward = staticmethod(lambda *a: None)

    why = cb._stale_reason(Old())
    assert why is not None and "stale" in why and "rebuild" in why
    if cb._C is not None:
        assert cb._stale_reason(cb._C) is None


def test_missing_extension_reason(monkeypatch):
    monkeypatch.setattr(cb, "_C", None)
    monkeypatch.setattr(cb, "_IMPORT_ERROR", "the CUDA extension guidance_kernels._C is not built; ...")
    assert "not built" in cb.available(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="not built"):
        cb.gram([torch.randn(3, 4)])


# =========================================================================== CPU: host API checks
@needs_ext
class TestHostApiChecks:
    """The extension's own argument checks; they run before any CUDA call, so CPU tensors reach
    each of them (the device check comes last)."""

    def test_empty_lists(self):
        assert cb._C.gram([]) == []
        assert cb._C.gram_backward([], []) == []
        assert cb._C.cross([], []) == ([], [], [], [], [])
        assert cb._C.cross_backward([], [], [], [], []) == []

    def test_cpu_tensor(self):
        with pytest.raises(RuntimeError, match=r"gram: xs\[0\] must be a CUDA tensor, got device cpu"):
            cb._C.gram([torch.randn(4, 8)])
        with pytest.raises(RuntimeError, match=r"cross: xs\[0\] must be a CUDA tensor"):
            cb._C.cross([torch.randn(4, 8)], [torch.randn(4, 3)])
        with pytest.raises(RuntimeError, match=r"gram_backward: xs\[0\] must be a CUDA tensor"):
            cb._C.gram_backward([torch.randn(4, 4)], [torch.randn(4, 8)])
        with pytest.raises(RuntimeError, match=r"cross_backward: xs\[0\] must be a CUDA tensor"):
            cb._C.cross_backward(
                [torch.randn(4, 8)], [torch.randn(8, 8)], [torch.randn(4, 3)], [torch.randn(3, 8)], [torch.randn(8)]
            )

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool, torch.complex64], ids=str)
    def test_bad_dtype(self, dtype):
        x = torch.zeros(4, 8, dtype=dtype)
        with pytest.raises(RuntimeError, match=r"xs\[0\] has dtype .*float32, float16 or bfloat16"):
            cb._C.gram([x])

    def test_mixed_dtypes_in_one_call(self):
        xs = [torch.randn(4, 8), torch.randn(4, 8).half()]
        with pytest.raises(RuntimeError, match=r"xs\[1\] has dtype Half but the first tensor .* Float"):
            cb._C.gram(xs)
        with pytest.raises(RuntimeError, match=r"ys\[0\] has dtype BFloat16"):
            cb._C.cross([torch.randn(4, 8)], [torch.randn(4, 8).bfloat16()])

    @pytest.mark.parametrize("shape", [(8,), (2, 3, 4), ()])
    def test_bad_rank(self, shape):
        with pytest.raises(RuntimeError, match=r"xs\[0\] must be 2-D"):
            cb._C.gram([torch.zeros(shape)])

    def test_bad_strides(self):
        x = torch.randn(8, 6).T  # (6, 8) with column stride 6
        with pytest.raises(RuntimeError, match=r"xs\[0\] must have unit stride along its last dimension"):
            cb._C.gram([x])
        y = torch.randn(1, 8).expand(4, 8)  # rows overlap (row stride 0)
        with pytest.raises(RuntimeError, match=r"xs\[0\] has overlapping rows"):
            cb._C.gram([y])

    def test_list_lengths(self):
        with pytest.raises(RuntimeError, match=r"ms and xs must have the same length, got 2 and 1"):
            cb._C.gram_backward([torch.randn(4, 4)] * 2, [torch.randn(4, 8)])
        with pytest.raises(RuntimeError, match=r"xs and ys must have the same length"):
            cb._C.cross([torch.randn(4, 8)], [])
        with pytest.raises(RuntimeError, match=r"xs and vs must have the same length"):
            cb._C.cross_backward(
                [torch.randn(4, 8)], [torch.randn(8, 8)], [torch.randn(4, 3)], [torch.randn(3, 8)], []
            )

    def test_gram_backward_factor(self):
        x = torch.randn(4, 8)
        with pytest.raises(RuntimeError, match=r"ms\[0\] must have shape \[4, 4\], got \[4, 5\]"):
            cb._C.gram_backward([torch.randn(4, 5)], [x])
        with pytest.raises(RuntimeError, match=r"ms\[0\] must be float32, got Double"):
            cb._C.gram_backward([torch.randn(4, 4, dtype=torch.float64)], [x])
        with pytest.raises(RuntimeError, match=r"ms\[0\] must be contiguous"):
            cb._C.gram_backward([torch.randn(8, 4)[::2]], [x])

    def test_cross_shapes(self):
        with pytest.raises(RuntimeError, match=r"xs\[0\] and ys\[0\] must have the same number of rows"):
            cb._C.cross([torch.randn(4, 8)], [torch.randn(5, 3)])
        x, y = torch.randn(4, 8), torch.randn(4, 3)
        m, n, v = torch.randn(8, 8), torch.randn(3, 8), torch.randn(8)
        with pytest.raises(RuntimeError, match=r"ns\[0\] must have shape \[3, 8\], got \[8, 3\]"):
            cb._C.cross_backward([x], [m], [y], [n.T.contiguous()], [v])
        with pytest.raises(RuntimeError, match=r"vs\[0\] must have shape \[8\]"):
            cb._C.cross_backward([x], [m], [y], [n], [torch.randn(3)])
        with pytest.raises(RuntimeError, match=r"ms\[0\] must have shape \[8, 8\]"):
            cb._C.cross_backward([x], [torch.randn(3, 3)], [y], [n], [v])


# =========================================================================== CPU: Python glue
class FakeExt:
    """Stands in for guidance_kernels._C on the CPU: checks that the backend hands it what the
    kernels require (one dtype per call, unit column stride, fp32 contiguous factors) and computes
    with the reference backend."""

    ROW_SHIFTED = True

    def __init__(self):
        self.calls = []

    def _acts(self, ts):
        assert len({t.dtype for t in ts}) <= 1
        for t in ts:
            assert t.dtype in (torch.float32, torch.float16, torch.bfloat16)
            assert t.dim() == 2 and (t.size(1) <= 1 or t.stride(1) == 1)

    def _f32(self, ts):
        for t in ts:
            assert t.dtype == torch.float32 and t.is_contiguous()

    def gram(self, xs):
        self._acts(xs)
        self.calls.append(("gram", len(xs)))
        return ref.gram(xs)

    def gram_backward(self, ms, xs):
        self._acts(xs)
        self._f32(ms)
        self.calls.append(("gram_backward", len(xs)))
        return ref.gram_backward(ms, xs)

    def cross(self, xs, ys):
        self._acts(list(xs) + list(ys))
        self.calls.append(("cross", len(xs)))
        return tuple(ref.cross(xs, ys))

    def cross_backward(self, xs, ms, ys, ns, vs):
        self._acts(list(xs) + list(ys))
        self._f32(list(ms) + list(ns) + list(vs))
        self.calls.append(("cross_backward", len(xs)))
        return ref.cross_backward(xs, ms, ys, ns, vs)


@pytest.fixture
def fake_ext(monkeypatch):
    fake = FakeExt()
    monkeypatch.setattr(cb, "_C", fake)
    return fake


def _mixed_layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [
        r(6, 10).bfloat16(),
        r(6, 7).double(),
        r(9, 6).T,  # fp32, column stride 9
        r(6, 12).half()[:, ::2],  # fp16, column stride 2
        r(6, 3).bfloat16(),
        r(6, 1),
    ]


def test_glue_gram_and_backward(fake_ext):
    xs = _mixed_layers()
    got = cb.gram(xs)
    for k, x in zip(got, xs):
        assert k.dtype == acc_dtype(x.dtype) and rel(k, shifted(x) @ shifted(x).T) <= prod_tol(x.shape[1], x.dtype)
    assert [c[0] for c in fake_ext.calls] == ["gram"] * 3  # bf16, fp32, fp16 groups; fp64 -> reference
    ms = [torch.randn(6, 6, dtype=acc_dtype(x.dtype)) for x in xs]
    for d, m, x in zip(cb.gram_backward(ms, xs), ms, xs):
        assert d.dtype == x.dtype and d.shape == x.shape
        assert rel(d, fp64(m) @ shifted(x)) <= prod_tol(x.shape[0], x.dtype)


def test_glue_cross_and_backward(fake_ext):
    xs = _mixed_layers(1)
    ys = _mixed_layers(2)[::-1]  # pairs of different dtypes -> fp32
    outs = cb.cross(xs, ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X, Y = shifted(x), shifted(y)
        want = (X.T @ X, Y.T @ Y, X.T @ Y, X.sum(0), Y.sum(0))
        for k in range(5):
            assert outs[k][i].dtype == acc_dtype(x.dtype) or torch.float64 in (x.dtype, y.dtype)
            assert rel(outs[k][i], want[k]) <= prod_tol(x.shape[0], x.dtype if x.dtype.itemsize <= y.dtype.itemsize else y.dtype)
    ms = [torch.randn(x.shape[1], x.shape[1]) for x in xs]
    ns = [torch.randn(y.shape[1], x.shape[1]).T.contiguous().T for x, y in zip(xs, ys)]  # non-contiguous
    vs = [torch.randn(x.shape[1]) for x in xs]
    got = cb.cross_backward(xs, ms, ys, ns, vs)
    for d, x, m, y, n, v in zip(got, xs, ms, ys, ns, vs):
        want = shifted(x) @ fp64(m) + shifted(y) @ fp64(n) + fp64(v)
        assert d.dtype == x.dtype and d.shape == x.shape
        low = x.dtype if x.dtype.itemsize <= y.dtype.itemsize else y.dtype
        assert rel(d, want) <= prod_tol(x.shape[1] + y.shape[1] + 1, low) + prod_tol(1, x.dtype)


def test_glue_through_ops_autograd_and_opcheck(fake_ext):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 7, generator=g, dtype=torch.float32).requires_grad_() for _ in range(2)]
    ks = ops.gram(xs, "cuda")
    w = torch.randn(ks.shape, generator=g)
    grads = torch.autograd.grad((ks * w).sum(), xs)
    xr = [fp64(x).requires_grad_() for x in xs]
    kr = [centered(x) @ centered(x).T for x in xr]  # ops.gram returns centered Grams
    for k, want in zip(ks, kr):
        assert rel(k, want) <= prod_tol(7 + 2 * 5)
    want = torch.autograd.grad(sum((k * r).sum() for k, r in zip(kr, w)), xr)
    for gx, wx in zip(grads, want):
        assert rel(gx, wx) <= prod_tol(7 + 4 * 5)
    ys = [torch.randn(5, 4, generator=g) for _ in xs]
    torch.library.opcheck(torch.ops.guidance_kernels.gram.default, ([x.detach() for x in xs], "cuda"))
    torch.library.opcheck(torch.ops.guidance_kernels.cross.default, ([x.detach() for x in xs], ys, "cuda"))
    assert {c[0] for c in fake_ext.calls} >= {"gram", "gram_backward", "cross"}


# =========================================================================== GPU
gpu_ready = pytest.mark.skipif(
    cb._C is None or not torch.cuda.is_available() or cb.available(torch.device("cuda")) is not None,
    reason="needs the built extension and an sm_80+ CUDA device",
)


def _gpu_layers(dtype, seed=0):
    """Awkward layers: odd n and p, n = 1, p = 1, one full 64-tile, just over a tile, empty
    features, zero rows, non-contiguous views (column-strided, row-sliced with odd row stride,
    storage offset making the base unaligned), and one long layer that forces split-K."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    return [
        r(33, 200),
        r(1, 37),
        r(17, 1),
        r(64, 64),
        r(65, 129),
        r(130, 1000),
        r(5, 0),
        r(0, 7),
        r(40, 19).T,  # (19, 40), column stride 19
        r(21, 90)[:, ::3],  # (21, 30), column stride 3
        r(50, 77)[3:40, 1:70],  # (37, 69), odd row stride 77 (scalar loads)
        r(50, 80)[2:39, 1:70],  # (37, 69), row stride 80 but base not 16-byte aligned
        # large common offset (deep-layer-like): x' is exact in bf16/fp16 (Sterbenz), so the
        # 16-bit kernels take the K steps without lo products; fp32 CKA depends on the shift
        (torch.randn(48, 257, device="cuda", generator=g) * 0.01 + 3.0).to(dtype),
        r(96, 70_001),  # many K splits (atomics)
    ]


def _gpu_partner(x, q, dtype, g):
    return torch.randn(x.shape[0], q, device="cuda", generator=g).to(dtype)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_gram(dtype):
    xs = _gpu_layers(dtype)
    got = cb.gram(xs)
    for k, x in zip(got, xs):
        assert k.dtype == torch.float32 and k.shape == (x.shape[0], x.shape[0])
        want = shifted(x) @ shifted(x).T
        if want.numel() and want.norm() > 0:
            assert rel(k, want) <= prod_tol(x.shape[1], x.dtype), x.shape
        else:
            # p == 0 or n == 1 (x' = 0): exact zeros, not NaN (outputs are NaN-poisoned)
            assert torch.all(k == 0)
    # mirrored off-diagonal tiles and the diagonal tiles: symmetric to rounding
    for k in got:
        if k.numel() and k.norm() > 0:
            assert rel(k, k.T) <= frob_bound(torch.float32, 1)  # mirrored: equal up to a rounding


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_gram_backward(dtype):
    xs = _gpu_layers(dtype, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    ms = [torch.randn(x.shape[0], x.shape[0], device="cuda", generator=g) for x in xs]
    for d, m, x in zip(cb.gram_backward(ms, xs), ms, xs):
        assert d.dtype == dtype and d.shape == x.shape and d.is_contiguous()
        if d.numel():
            want = fp64(m) @ shifted(x)
            if want.norm() > 0:
                assert rel(d, want) <= prod_tol(x.shape[0], dtype), x.shape
            else:
                assert torch.all(d == 0), x.shape  # n == 1: x' = 0


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_cross(dtype):
    g = torch.Generator(device="cuda").manual_seed(4)
    xs = [x for x in _gpu_layers(dtype, seed=3) if x.shape[1] < 5000]
    xs.append(torch.randn(5000, 70, device="cuda", generator=g).to(dtype))  # long n: split-K
    qs = [3, 64, 65, 1, 130, 0, 33, 9, 200, 31, 7, 5, 70, 33]
    assert len(qs) == len(xs)
    ys = [_gpu_partner(x, q, dtype, g) for x, q in zip(xs, qs)]
    ys[-2] = ys[-2] - 7.0  # the offset layer's partner gets an offset of its own
    outs = cb.cross(xs, ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X, Y = shifted(x), shifted(y)
        want = (X.T @ X, Y.T @ Y, X.T @ Y, X.sum(0), Y.sum(0))
        for k in range(5):
            o = outs[k][i]
            assert o.dtype == torch.float32 and o.shape == want[k].shape
            if want[k].numel() and want[k].norm() > 0:
                assert rel(o, want[k]) <= prod_tol(x.shape[0], dtype), (i, k, x.shape, y.shape)
            else:
                assert torch.all(o == 0), (i, k)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_cross_backward(dtype):
    g = torch.Generator(device="cuda").manual_seed(5)
    xs = [x for x in _gpu_layers(dtype, seed=6) if x.shape[1] < 5000]
    qs = [3, 64, 65, 1, 130, 0, 33, 9, 200, 31, 7, 5, 70]
    assert len(qs) == len(xs)
    ys = [_gpu_partner(x, q, dtype, g) for x, q in zip(xs, qs)]
    f = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    ms = [f(x.shape[1], x.shape[1]) for x in xs]
    ns = [f(y.shape[1], x.shape[1]) for x, y in zip(xs, ys)]
    vs = [f(x.shape[1]) for x in xs]
    for d, x, m, y, n, v in zip(cb.cross_backward(xs, ms, ys, ns, vs), xs, ms, ys, ns, vs):
        assert d.dtype == dtype and d.shape == x.shape
        if d.numel():
            want = shifted(x) @ fp64(m) + shifted(y) @ fp64(n) + fp64(v)
            assert rel(d, want) <= prod_tol(x.shape[1] + y.shape[1] + 1, dtype), (x.shape, y.shape)


@pytest.mark.gpu
@gpu_ready
def test_gpu_mixed_dtype_lists_and_fp64():
    g = torch.Generator(device="cuda").manual_seed(7)
    xs = [torch.randn(20, 33, device="cuda", generator=g).to(d) for d in (torch.bfloat16, torch.float64, torch.float16, torch.float32)]
    for k, x in zip(cb.gram(xs), xs):
        assert k.dtype == acc_dtype(x.dtype) and rel(k, shifted(x) @ shifted(x).T) <= prod_tol(33, x.dtype)
    ys = xs[::-1]
    outs = cb.cross(xs, ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert rel(outs[2][i], shifted(x).T @ shifted(y)) <= prod_tol(20, torch.bfloat16)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_ops_autograd_opcheck_compile(dtype):
    g = torch.Generator(device="cuda").manual_seed(8)
    for n, p, q in [(70, 300, 40), (9, 5, 3)]:  # one group per shape
        xs = [torch.randn(n, p, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2)]
        ys = [torch.randn(n, q, device="cuda", generator=g).to(dtype) for _ in xs]
        ks = ops.gram(xs, "cuda")
        w = torch.randn(ks.shape, device="cuda", generator=g)
        grads = torch.autograd.grad((ks * w).sum(), xs)
        xr = [fp64(x).requires_grad_() for x in xs]
        kr = [centered(x) @ centered(x).T for x in xr]  # ops.gram returns centered Grams
        for k, want in zip(ks, kr):
            assert rel(k, want) <= prod_tol(p + 2 * n, dtype)
        want = torch.autograd.grad(sum((k * r).sum() for k, r in zip(kr, w)), xr)
        for gx, wx in zip(grads, want):
            assert rel(gx, wx) <= prod_tol(p + 4 * n, dtype)
        # ops.cross: centered Xcᵀ Xc, Ycᵀ Yc, Xcᵀ Yc and the column means, stacked
        a, b, c, sx, sy = ops.cross(xs, ys, "cuda")
        loss = a.square().sum() + c.square().sum() + sx.square().sum()
        grads = torch.autograd.grad(loss, xs)
        xr = [fp64(x).requires_grad_() for x in xs]
        yr = [centered(y) for y in ys]
        want = sum(
            (centered(X).T @ centered(X)).square().sum()
            + (centered(X).T @ Y).square().sum()
            + X.mean(0).square().sum()
            for X, Y in zip(xr, yr)
        )
        for gx, wx in zip(grads, torch.autograd.grad(want, xr)):
            assert rel(gx, wx) <= 2 * prod_tol(p * p + n, dtype)
        det = [x.detach() for x in xs]
        torch.library.opcheck(torch.ops.guidance_kernels.gram.default, (det, "cuda"))
        torch.library.opcheck(torch.ops.guidance_kernels.cross.default, (det, ys, "cuda"))
        compiled = torch.compile(lambda t: ops.gram(t, "cuda"), fullgraph=True)
        assert rel(compiled(det), ops.gram(det, "cuda")) <= prod_tol(p + 2 * n)


def _deep_mlp_acts(depth=12, n=512, width=256, seed=0):
    """ReLU outputs of a default-initialised deep MLP (built and run on the CPU in fp32, so the
    values do not depend on the GPU): deep layers share a large common offset."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(*[m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())])
        acts, h = [], torch.randn(n, width)
    with torch.no_grad():
        for m in net:
            h = m(h)
            if isinstance(m, torch.nn.ReLU):
                acts.append(h)
    return acts


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("n", [512, 96], ids=["feature_form", "sample_form"])
def test_gpu_large_offset_cka_fp32(n):
    """fp32 CKA through backend="cuda" of deep activations whose centered Gram is ~1e-7 of the raw
    one matches fp64 to 1e-4 (centering a raw fp32 Gram got ~0.16 here instead of ~0.32)."""
    acts = _deep_mlp_acts(n=n)
    x, y, z = acts[-1], acts[1], _deep_mlp_acts(n=n, seed=1)[-1]
    X = x.double()
    k = X @ X.T
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    assert (kc.norm() / k.norm()).item() < 1e-5  # the case is as hard as advertised
    for a, b in [(x, y), (x, z), (x, x)]:
        for debiased in (False, True):
            want = gk.cka(a.double(), b.double(), debiased=debiased, backend="reference").item()
            got = gk.cka(a.cuda(), b.cuda(), debiased=debiased, backend="cuda")
            assert got.dtype == torch.float32
            assert abs(got.item() - want) <= 8 * prod_tol(max(x.shape)), (debiased, got.item(), want)
    # the raw products agree with fp64 shifted products to fp32 accuracy as well
    xc = x.cuda()
    assert rel(cb.gram([xc])[0], shifted(x) @ shifted(x).T) <= prod_tol(x.shape[1])
    a, _, c, sx, _ = cb.cross([xc], [y.cuda()])
    assert rel(a[0], shifted(x).T @ shifted(x)) <= prod_tol(n)
    assert rel(c[0], shifted(x).T @ shifted(y)) <= prod_tol(n)
    assert rel(sx[0], shifted(x).sum(0)) <= prod_tol(n)


from guidance_kernels.bench.workloads import WORKLOADS as _BENCH_WORKLOADS  # noqa: E402

# name: (n, target feature sizes, guide feature sizes), from the bench's single definition
WORKLOADS = {
    name: (w.n, [p for _, p, _ in w.dims()], [q for _, _, q in w.dims()])
    for name, w in _BENCH_WORKLOADS.items()
}


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_gpu_workload(workload, dtype):
    """Full-size canonical workloads: the guidance loss and the target gradients through the
    CUDA backend vs the fp64 reference (the same rounded inputs, upcast), plus the raw products
    of the workload's form (sample-space Grams; feature-space cross for W3) on a few layers."""
    n, ps, qs = WORKLOADS[workload]
    g = torch.Generator(device="cuda").manual_seed(11)
    xs = [torch.randn(n, p, device="cuda", generator=g).to(dtype).requires_grad_() for p in ps]
    ys = [torch.randn(n, q, device="cuda", generator=g).to(dtype) for q in qs]
    loss = gk.guidance_loss(xs, ys, backend="cuda")
    grads = torch.autograd.grad(loss, xs)
    xr = [fp64(x).requires_grad_() for x in xs]
    want = gk.guidance_loss(xr, [fp64(y) for y in ys], backend="reference")
    wgrads = torch.autograd.grad(want, xr)
    kmax = max(ps + qs) if n <= 4096 else n  # longest fp32 sum of the workload's form
    assert rel(loss, want) <= 4 * prod_tol(kmax, dtype)
    for a, b in zip(grads, wgrads):
        assert a.dtype == dtype and rel(a, b) <= 16 * prod_tol(kmax, dtype)
    del grads, wgrads, xr
    k = min(4, len(xs))
    det = [x.detach() for x in xs[:k]]
    for kk, x in zip(cb.gram(det), det):
        assert rel(kk, shifted(x) @ shifted(x).T) <= prod_tol(x.shape[1], dtype)
    m = [torch.randn(n, n, device="cuda", generator=g) for _ in det]
    for d, mm, x in zip(cb.gram_backward(m, det), m, det):
        assert rel(d, fp64(mm) @ shifted(x)) <= prod_tol(n, dtype)
    if n > 4096:
        a, b, c, sx, sy = cb.cross(det[:2], ys[:2])
        for i in range(2):
            X, Y = shifted(det[i]), shifted(ys[i])
            for got, want in ((a[i], X.T @ X), (b[i], Y.T @ Y), (c[i], X.T @ Y), (sx[i], X.sum(0)), (sy[i], Y.sum(0))):
                assert rel(got, want) <= prod_tol(n, dtype)
