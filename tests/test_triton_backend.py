"""Triton backend beyond the per-op checks (those are in ``test_op_gram.py``,
``test_op_cross.py``, ``test_op_gram_stats.py``; the sm_90 compile check is in
``test_triton_sm90_compile.py``): mixed dtypes, edge cases, launch
counts and the layout fast path, end to end against the reference backend, opcheck and
torch.compile through the ops, and the canonical workloads on a GPU. A large common offset:
``test_triton_large_offset.py``.

Every product is of the row-shifted activation ``x' = x - 1 x[0]`` (the backend contract), so
the fp64 expectations are built from :func:`sh`; inputs carry common offsets so that an
unshifted (or wrongly shifted) kernel fails.

Without CUDA this runs the kernels under TRITON_INTERPRET=1 (set by conftest) on tiny shapes;
launch parameters are shrunk (16x16 tiles, short K chunks) so that several tiles per layer, the
symmetric mirror, split-K with the finalize pass and the unsplit direct store are all exercised.
The ``gpu`` tests run the canonical workloads W1-W5 (``bench/workloads.py``) at full size.
"""

from __future__ import annotations

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import ops
from guidance_kernels.backends import get_backend

from helpers import DTYPES, close, fp64, products, sh
from helpers import TRITON_SMALL as SMALL
from helpers import TRITON_SPLIT as SPLIT
from helpers import device
from tolerance import abs_product, bound, centered_scale, eps, rel

triton = pytest.importorskip("triton")
from guidance_kernels.backends import triton as tb  # noqa: E402

DEV = device()


@pytest.fixture(autouse=True)
def _ready():
    why = get_backend("triton").available(torch.device(DEV))
    if why is not None:
        pytest.skip(why)


def tol(dtype, k, c):
    """Relative bound for a loss or gradient from ``k``-term fp32 sums of ``dtype`` operands."""
    return c * (k * eps(torch.float32) + eps(dtype))


# --------------------------------------------------------------------------- dtypes, edge cases


def test_mixed_and_fp64_dtypes():
    """Pairs of different dtypes get their own launch (fp32 math); fp64 goes to the reference."""
    g = torch.Generator().manual_seed(5)
    x16 = torch.randn(9, 40, generator=g).half().to(DEV)
    x32 = torch.randn(9, 24, generator=g).to(DEV)
    x64 = torch.randn(9, 13, generator=g, dtype=torch.float64).to(DEV)
    xs, ys = [x16, x32, x64], [x32, x16, x64]
    with tb.tuning(**SMALL):
        grams = tb.gram(xs)
        a, b, c, sx, sy = tb.cross(xs, ys)
        ms = [torch.randn(x.shape[1], x.shape[1], generator=g).to(DEV, k.dtype) for x, k in zip(xs, a)]
        ns = [torch.randn(y.shape[1], x.shape[1], generator=g).to(DEV, k.dtype) for x, y, k in zip(xs, ys, a)]
        vs = [torch.randn(x.shape[1], generator=g).to(DEV, k.dtype) for x, k in zip(xs, a)]
        dx = tb.cross_backward(xs, ms, ys, ns, vs)
    assert grams[2].dtype == torch.float64 and a[2].dtype == torch.float64
    for i, (x, y) in enumerate(zip(xs, ys)):
        low = x.dtype if x.dtype.itemsize <= y.dtype.itemsize else y.dtype  # the pair's lowest precision
        X, Y = sh(x), sh(y)
        close(grams[i], X @ X.T, abs_product(X, X.T), x.dtype, k=X.shape[1])
        close(c[i], X.T @ Y, abs_product(X.T, Y), low, k=X.shape[0])
        # y'.sum(0) comes from the y'ᵀy' launch, whose shifted y' is rounded to y's dtype
        close(sy[i], Y.sum(0), Y.abs().sum(0), y.dtype, k=Y.shape[0])
        scale = abs_product(X, ms[i]) + abs_product(Y, ns[i]) + fp64(vs[i]).abs()
        close(dx[i], X @ fp64(ms[i]) + Y @ fp64(ns[i]) + fp64(vs[i]), scale, low, k=X.shape[1] + Y.shape[1] + 1, c=4)


def test_edge_cases():
    assert tb.gram([]) == [] and tb.gram_backward([], []) == []
    empty = tb.gram([torch.randn(0, 5).to(DEV), torch.randn(3, 0).to(DEV)])
    assert empty[0].shape == (0, 0) and torch.equal(empty[1], torch.zeros(3, 3, device=DEV))
    x = torch.randn(2, 1).to(DEV)
    (k,) = tb.gram([x])
    close(k, sh(x) @ sh(x).T, abs_product(sh(x), sh(x).T), torch.float32, k=1)
    (k,) = tb.gram([torch.randn(1, 7).to(DEV)])  # n = 1: x' = 0
    assert torch.equal(k, torch.zeros(1, 1, device=DEV))
    a, _b, _c, sx, _sy = tb.cross([torch.randn(0, 4).to(DEV)], [torch.randn(0, 3).to(DEV)])  # no row 0
    assert torch.equal(a[0], torch.zeros(4, 4, device=DEV)) and torch.equal(sx[0], torch.zeros(4, device=DEV))
    with pytest.raises(ValueError):
        tb.gram([torch.randn(2, 3, 4).to(DEV)])




class _Count:
    """Counts launches of a Triton kernel (wraps ``kernel[grid]``) and keeps the compile-time
    flags of the latest one (``flags``: its keyword arguments)."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.programs, self.flags = kernel, 0, 0, {}

    def __getitem__(self, grid):
        self.launches += 1
        self.programs += grid[0]
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.flags = kwargs
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize("aligned", [True, False])
def test_one_launch_for_many_layers(monkeypatch, aligned):
    """W5-like: 40 pairs of different widths in one forward launch (+ at most one finalize) and
    one backward launch. Layers are classed by layout/alignment (compile-time fast path), so a
    list mixing aligned and odd widths takes one launch per class: two."""
    from guidance_kernels.kernels import triton_backward, triton_forward

    counts = {}
    kernels = [(triton_forward, "forward_kernel"), (triton_forward, "forward_finalize_kernel"),
               (triton_backward, "backward_kernel")]
    for mod, name in kernels:
        counts[name] = _Count(getattr(mod, name))
        monkeypatch.setattr(mod, name, counts[name])
    g = torch.Generator().manual_seed(6)
    widths = [8 * (2 + i % 5) if aligned else 16 + i % 5 for i in range(40)]
    xs = [torch.randn(8, w, generator=g).to(DEV).requires_grad_() for w in widths]
    ys = [torch.randn(8, 16, generator=g).to(DEV) for _ in range(40)]
    loss = gk.guidance_loss(xs, ys, backend="triton", form="sample")
    loss.backward()
    classes = 1 if aligned else 2
    assert counts["forward_kernel"].launches == classes
    assert counts["forward_finalize_kernel"].launches <= classes
    assert counts["backward_kernel"].launches == classes
    ref = [x.detach().clone().requires_grad_() for x in xs]
    want = gk.guidance_loss(ref, ys, backend="reference", form="sample")
    want.backward()
    k = max(widths) + 8 * 8  # fp32 sums: features into Grams, Gram entries into statistics
    assert rel(loss, want) <= bound(torch.float32, k)
    assert max(rel(a.grad, b.grad) for a, b in zip(xs, ref)) <= bound(torch.float32, k, c=32)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("form", ["sample", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_guidance_loss_matches_reference(dtype, form):
    """Value and gradient (targets and a trainable guide) vs the reference backend in fp64."""
    g = torch.Generator().manual_seed(7)
    shapes = [(24, 3, 5, 5), (24, 40), (24, 7)]
    xs = [torch.randn(*s, generator=g).to(dtype).to(DEV).requires_grad_() for s in shapes]
    ys = [torch.randn(24, q, generator=g).to(dtype).to(DEV) for q in (30, 11, 64)]
    ys[1].requires_grad_()
    with tb.tuning(**SPLIT):
        loss = gk.guidance_loss(xs, ys, backend="triton", form=form)
        loss.backward()
    xr = [fp64(x).requires_grad_() for x in xs]
    yr = [fp64(y).requires_grad_() for y in ys]
    want = gk.guidance_loss(xr, yr, backend="reference", form=form)
    want.backward()
    k = 75 + 24  # longest fp32 sum: 75 features (sample form) or 24 samples, then n² Gram terms
    assert loss.dtype == torch.float32 and rel(loss, want) <= tol(dtype, k + 24 * 24, c=4)
    for a, b in zip(xs + [ys[1]], xr + [yr[1]]):
        assert a.grad.dtype == dtype
        assert rel(a.grad, b.grad) <= tol(dtype, k + 24 * 24, c=16)
    assert ys[0].grad is None


@pytest.mark.parametrize("metric", ["debiased_cka", "procrustes"])
def test_other_metrics_and_centered_gram(metric):
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(12, 30, generator=g).to(DEV).requires_grad_() for _ in range(2)]
    ys = [torch.randn(12, 20, generator=g).to(DEV) for _ in range(2)]
    got = gk.pair_scores(xs, ys, metric=metric, backend="triton")
    want = gk.pair_scores(xs, ys, metric=metric, backend="reference")
    k = 30 + 12 * 12  # fp32 sums: 30 features into Grams, then n² Gram terms
    assert rel(got, want) <= bound(torch.float32, k)
    gx = torch.autograd.grad(got.sum(), xs)
    wx = torch.autograd.grad(want.sum(), xs)
    assert max(rel(a, b) for a, b in zip(gx, wx)) <= bound(torch.float32, k, c=32)
    x = xs[0].detach()
    X = sh(x)  # both backends center products of the shifted x: Σ|terms| of those, then centering
    close(gk.centered_gram(x, backend="triton"), gk.centered_gram(x, backend="reference"),
          centered_scale(abs_product(X, X.T)), torch.float32, k=30 + 2 * 12)


# --------------------------------------------------------------------------- opcheck, compile
def _op_cases():
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    x1, x2 = r(10, 9).requires_grad_(), r(20, 5)[::2].requires_grad_()  # (10, 5) row-strided
    x3 = r(20, 9)[::2].requires_grad_()  # (10, 9) row-strided
    y1, y2 = r(10, 4).requires_grad_(), r(4, 10).T  # (10, 4) column-strided
    return {
        "gram": (torch.ops.guidance_kernels.gram.default, ([x1, x2], "triton")),
        "gram_backward": (
            torch.ops.guidance_kernels.gram_backward.default,
            (r(2, 10, 10).requires_grad_(), [x1, x2], "triton"),
        ),
        "cross": (torch.ops.guidance_kernels.cross.default, ([x1, x3], [y1, y2], "triton")),
        "cross_backward": (
            torch.ops.guidance_kernels.cross_backward.default,
            ([x1, x3], r(2, 9, 9).requires_grad_(), [y1, y2], r(2, 4, 9), r(2, 9), "triton"),
        ),
    }


@pytest.mark.parametrize("name", ["gram", "gram_backward", "cross", "cross_backward"])
def test_opcheck(name):
    op, args = _op_cases()[name]
    with tb.tuning(**SMALL):
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(10, 3, 4, generator=g).to(DEV).requires_grad_(), torch.randn(10, 33, generator=g).to(DEV).requires_grad_()]
    ys = [torch.randn(10, 8, generator=g).to(DEV), torch.randn(10, 40, generator=g).to(DEV)]

    def f(xs, ys):
        return gk.guidance_loss(xs, ys, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(xs, ys)
    gx = torch.autograd.grad(got, xs)
    want = f(xs, ys)
    wx = torch.autograd.grad(want, xs)
    k = 40 + 10 * 10
    assert rel(got, want) <= bound(torch.float32, k)
    assert max(rel(a, b) for a, b in zip(gx, wx)) <= bound(torch.float32, k, c=32)


# --------------------------------------------------------------------------- GPU: W1-W5
from guidance_kernels.bench.workloads import WORKLOADS as _BENCH_WORKLOADS  # noqa: E402

# name: (n, target feature sizes, guide feature sizes), from the bench's single definition
WORKLOADS = {
    name: (w.n, [p for _, p, _ in w.dims()], [q for _, _, q in w.dims()])
    for name, w in _BENCH_WORKLOADS.items()
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_gpu_workload(workload, dtype):
    """Full-size canonical workloads: loss value and target gradients of the triton backend vs
    the fp64 reference (the same low-precision inputs, upcast), plus the raw Grams."""
    n, ps, qs = WORKLOADS[workload]
    g = torch.Generator(device="cuda").manual_seed(11)
    xs = [torch.randn(n, p, device="cuda", generator=g, dtype=dtype).requires_grad_() for p in ps]
    ys = [torch.randn(n, q, device="cuda", generator=g, dtype=dtype) for q in qs]
    # CKA gradients are ~1/(n p): below fp16's range for these p. Scale the loss as
    # torch.amp.GradScaler would (2**16) so the fp16 gradients are representable.
    scale = 2.0**16
    loss = gk.guidance_loss(xs, ys, backend="triton")
    grads = torch.autograd.grad(loss * scale, xs)
    xr = [fp64(x).requires_grad_() for x in xs]
    want = gk.guidance_loss(xr, [fp64(y) for y in ys], backend="reference")
    wgrads = torch.autograd.grad(want * scale, xr)
    # relative, Frobenius: random-sign rounding errors grow like sqrt(k), so k eps bounds them
    kmax = max(ps + qs) if n <= 4096 else n
    assert rel(loss, want) <= tol(dtype, kmax, c=4)
    for a, b in zip(grads, wgrads):
        assert a.dtype == dtype and rel(a, b) <= tol(dtype, kmax, c=16)
    del grads, wgrads, xr
    # the raw products themselves, on a few layers
    k = min(4, len(xs))
    for kk, x in zip(tb.gram([x.detach() for x in xs[:k]]), xs[:k]):
        X = sh(x)
        close(kk, X @ X.T, abs_product(X, X.T), dtype, k=X.shape[1])
    if n > 4096:
        got = tb.cross([x.detach() for x in xs[:2]], ys[:2])
        for i in range(2):
            for j, (want, scale) in enumerate(products(sh(xs[i]), sh(ys[i]))):
                close(got[j][i], want, scale, dtype, k=n, msg=f"layer {i} product {j}")


@pytest.mark.gpu
def test_gpu_w5_launch_count(monkeypatch):
    test_one_launch_for_many_layers(monkeypatch, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contiguous_aligned_fast_path(monkeypatch, dtype):
    """Contiguous layers with sizes that are multiples of 8 take the specialized path
    (compile-time unit strides and alignment hints); results must not change."""
    g = torch.Generator().manual_seed(12)
    xs = [(torch.randn(n, p, generator=g) + 2).to(dtype).to(DEV) for n, p in [(16, 64), (24, 40), (8, 8)]]
    ys = [(torch.randn(x.shape[0], q, generator=g) - 1).to(dtype).to(DEV) for x, q in zip(xs, [32, 16, 24])]
    from guidance_kernels.kernels import triton_backward, triton_forward

    fwd, fin, bwd = (_Count(triton_forward.forward_kernel), _Count(triton_forward.forward_finalize_kernel),
                     _Count(triton_backward.backward_kernel))
    monkeypatch.setattr(triton_forward, "forward_kernel", fwd)
    monkeypatch.setattr(triton_forward, "forward_finalize_kernel", fin)
    monkeypatch.setattr(triton_backward, "backward_kernel", bwd)
    layout = lambda c, *names: {k: c.flags[k] for k in names}  # noqa: E731
    with tb.tuning(**SPLIT):
        grams = tb.gram(xs)
        assert fin.launches > 0  # split-K ran
        assert layout(fwd, "A_LAYOUT", "B_LAYOUT", "ALIGN", "SHIFT") == dict(A_LAYOUT=2, B_LAYOUT=1, ALIGN=True, SHIFT=1)
        a, b, c, sx, sy = tb.cross(xs, ys)
        assert layout(fwd, "A_LAYOUT", "B_LAYOUT", "ALIGN", "SHIFT") == dict(A_LAYOUT=1, B_LAYOUT=2, ALIGN=True, SHIFT=2)
        ms = [torch.randn(x.shape[0], x.shape[0], generator=g).to(DEV) for x in xs]
        d = tb.gram_backward(ms, xs)
        want = dict(A_LAYOUT=1, W_LAYOUT=1, O_LAYOUT=1, ALIGN=True, SHIFT=2)
        assert layout(bwd, *want) == want
        mm = [torch.randn(x.shape[1], x.shape[1], generator=g).to(DEV) for x in xs]
        nn_ = [torch.randn(y.shape[1], x.shape[1], generator=g).to(DEV) for x, y in zip(xs, ys)]
        vv = [torch.randn(x.shape[1], generator=g).to(DEV) for x in xs]
        e = tb.cross_backward(xs, mm, ys, nn_, vv)
        want = dict(A_LAYOUT=2, W_LAYOUT=2, O_LAYOUT=2, ALIGN=True, SHIFT=1)
        assert layout(bwd, *want) == want
    for i, (x, y) in enumerate(zip(xs, ys)):
        X, Y = sh(x), sh(y)
        close(grams[i], X @ X.T, abs_product(X, X.T), dtype, k=X.shape[1])
        for j, (got, (want, scale)) in enumerate(zip((a[i], b[i], c[i], sx[i], sy[i]), products(X, Y))):
            close(got, want, scale, dtype, k=X.shape[0], msg=f"layer {i} product {j}")
        close(d[i], fp64(ms[i]) @ X, abs_product(ms[i], X), dtype, k=X.shape[0], c=4)
        scale = abs_product(X, mm[i]) + abs_product(Y, nn_[i]) + fp64(vv[i]).abs()
        close(e[i], X @ fp64(mm[i]) + Y @ fp64(nn_[i]) + fp64(vv[i]), scale, dtype, k=X.shape[1] + Y.shape[1] + 1, c=4)
