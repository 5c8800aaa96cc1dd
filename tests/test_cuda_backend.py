"""CUDA C++ backend (``guidance_kernels._C``, sources in ``csrc/``), beyond the per-op checks
(every primitive on awkward shapes: ``test_op_gram.py``, ``test_op_cross.py``) and the host
API's argument checks (``test_cuda_host_checks.py``).

Without a GPU (CI, the dev box) these tests check what can be checked on a CPU:
* the extension was built by ``pip install`` wherever nvcc and a CUDA torch are present, and it
  imports (CI installs from a fresh clone, so a compile error fails the install itself);
* ``backend="cuda"`` on CPU tensors says clearly why it cannot run;
* the Python glue (dtype grouping, fp64 -> reference, stride fixes, mixed-dtype pairs, result
  order) is right, run against a fake extension that computes with the reference backend, also
  through the torch.library ops (autograd, opcheck).
The ``gpu`` tests run the kernels: mixed dtype lists, the ops (autograd, opcheck, compile),
and the canonical workloads W1-W5 (``bench/workloads.py``) at full size, against fp64 in value and gradient, for float32, float16 and
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

from helpers import DTYPES, centered, cuda_ready, fp64, rel, shifted
from helpers import cuda_prod_tol as prod_tol


def _toolchain_present() -> bool:
    return torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    )


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
gpu_ready = cuda_ready()


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
