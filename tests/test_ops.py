"""torch.library registration: opcheck, torch.compile(fullgraph=True), autocast, layouts."""

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import ops
from tolerance import abs_scale, assert_within, bound


def _xy(n=8, p=6, q=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, p, generator=g, dtype=dtype, requires_grad=True),
        torch.randn(n, q, generator=g, dtype=dtype, requires_grad=True),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_every_op(dtype):
    x, y = _xy(dtype=dtype)
    x2, _ = _xy(p=3, dtype=dtype, seed=1)
    x3, y3 = _xy(dtype=dtype, seed=2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = torch.randn(2, 8, 8, dtype=acc, requires_grad=True)
    mp = torch.randn(2, 6, 6, dtype=acc, requires_grad=True)
    nq = torch.randn(2, 4, 6, dtype=acc, requires_grad=True)
    v = torch.randn(2, 6, dtype=acc, requires_grad=True)
    cases = [
        (ops.gram, ([x, y, x2], "reference")),
        (ops.gram_backward, (m, [x, x2], "reference")),
        (ops.cross, ([x, x3], [y, y3], "reference")),
        (ops.cross_backward, ([x, x3], mp, [y, y3], nq, v, "reference")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_stats_op(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 5, generator=g, dtype=dtype)
    k = (x @ x.mT).requires_grad_()
    l = torch.randn(3, 7, 7, generator=g, dtype=dtype).requires_grad_()
    st = ops.gram_stats(k, l, "reference")
    kd, ld = k.double(), l.double()
    want = torch.stack([(kd * ld).sum((1, 2)), (kd * kd).sum((1, 2)), (ld * ld).sum((1, 2)),
                        kd.diagonal(dim1=1, dim2=2).sum(1), ld.diagonal(dim1=1, dim2=2).sum(1)], 1)
    assert st.dtype == torch.float64 and st.shape == (3, 5)
    # fp64 sums of 49 products in another order: within 49 eps64 of the sum of |terms|
    ka, la = kd.abs(), ld.abs()
    sums_abs = torch.stack([(ka * la).sum((1, 2)), (ka * ka).sum((1, 2)), (la * la).sum((1, 2)),
                            ka.diagonal(dim1=1, dim2=2).sum(1), la.diagonal(dim1=1, dim2=2).sum(1)], 1)
    assert ((st - want).abs() <= bound(torch.float64, 7 * 7) * sums_abs).all()
    torch.library.opcheck(ops.gram_stats, (k, l, "reference"))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda k, l: ops.gram_stats(k, l, "reference"), (k, l))
        assert torch.autograd.gradgradcheck(lambda k, l: ops.gram_stats(k, l, "reference"), (k, l))
    with pytest.raises(ValueError, match="one shape"):
        ops.gram_stats(k, l[:, :6, :6], "reference")


def test_ops_return_one_stack_per_group():
    x, y = _xy()
    x2, _ = _xy(p=3, seed=1)
    k = ops.gram([x, y, x2], "reference")
    assert k.shape == (3, 8, 8) and k.dtype == torch.float32
    a, b, c, mx, my = ops.cross([x, x], [y, y], "reference")
    assert (a.shape, b.shape, c.shape, mx.shape, my.shape) == ((2, 6, 6), (2, 4, 4), (2, 6, 4), (2, 6), (2, 4))
    assert mx.dtype == my.dtype == torch.float64


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, y, z: ops.gram([x, z], "reference"), r"xs\[1\] has shape \(5, 3\); a group needs \(8, p\)"),
        (lambda x, y, z: ops.gram([], "reference"), "empty list xs"),
        (lambda x, y, z: ops.gram([x, x.double()], "reference"), "mixes accumulation dtypes"),
        (lambda x, y, z: ops.cross([x, y], [y, y], "reference"), r"xs\[1\] has shape \(8, 4\); a group needs \(8, 6\)"),
        (lambda x, y, z: ops.cross([x], [z], "reference"), "1 xs of"),
    ],
)
def test_ops_reject_malformed_groups(call, match):
    x, y = _xy()
    z, _ = _xy(n=5, p=3, seed=1)
    with pytest.raises(ValueError, match=match):
        call(x.detach(), y.detach(), z.detach())


@pytest.mark.parametrize("metric", gk.METRICS)
def test_compile_fullgraph_matches_eager(metric):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(12, 3, 4, 4, generator=g, requires_grad=True),
        torch.randn(12, 40, generator=g, requires_grad=True),
        torch.randn(12, 2, generator=g, requires_grad=True),  # feature-space pair for "cka"
    ]
    ys = [torch.randn(12, 10, generator=g), torch.randn(12, 5, 3, generator=g), torch.randn(12, 3, generator=g)]

    def f(xs, ys):
        return gk.guidance_loss(xs, ys, metric=metric, weights=[1.0, 0.5, 2.0])

    eager = f(xs, ys)
    ge = torch.autograd.grad(eager, xs)
    compiled = torch.compile(f, fullgraph=True)(xs, ys)
    gc = torch.autograd.grad(compiled, xs)
    # compiled and eager code may fuse and order the fp32 sums differently (longest sum: the
    # 48 features of pair 0 into its Gram, then n² = 144 Gram entries); gradients pass through
    # one more such chain, and CKA's gradient is O(1/||Xc||) relative to its value
    assert_within(compiled, eager, dtype=torch.float32, k=48 + 144, c=8)
    for a, b in zip(gc, ge):
        assert_within(a, b, dtype=torch.float32, k=48 + 144, c=64)


def test_compiled_training_step_with_module():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    crit = gk.GuidanceLoss(metric="cka")
    x = torch.randn(32, 10)
    guide = torch.randn(32, 7)

    def step(x):
        h = net[1](net[0](x))
        return net[2](h).square().mean() + crit([h], [guide])

    loss = torch.compile(step, fullgraph=True)(x)
    loss.backward()
    assert torch.isfinite(net[0].weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_activations_give_fp32_loss(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 30)
    x, guide = torch.randn(16, 20), torch.randn(16, 9)
    with torch.autocast("cpu", dtype=dtype):
        h = lin(x)
        assert h.dtype == dtype
        loss = gk.guidance_loss([h], [guide])
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()
    want = gk.guidance_loss([h.detach().double()], [guide.double()])
    # the activations are rounded to the autocast dtype, then exact: fp32 sums over 30 features
    assert_within(loss, want, dtype=torch.float32, k=30 + 16 * 16, c=16)


def test_non_contiguous_and_channels_last_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, 5, 6, generator=g, dtype=torch.float64)
    y = torch.randn(10, 7, generator=g, dtype=torch.float64)
    want = gk.cka(x, y)
    cl = x.to(memory_format=torch.channels_last).requires_grad_()
    # the same values in another memory order: fp64 sums of 120 features in another order
    tol = dict(dtype=torch.float64, k=120 + 100, c=16)
    assert_within(gk.cka(cl, y), want, **tol)
    (gx,) = torch.autograd.grad(gk.cka(cl, y), (cl,))
    assert gx.shape == cl.shape and torch.isfinite(gx).all()
    t = torch.randn(7, 10, generator=g, dtype=torch.float64).T  # transposed view
    assert_within(gk.cka(t, y), gk.cka(t.contiguous(), y), **tol)
    sl = torch.randn(10, 20, generator=g, dtype=torch.float64)[:, ::3]
    assert_within(gk.cka(sl, y), gk.cka(sl.contiguous(), y), **tol)


def test_backend_argument_dispatch():
    x, y = _xy()
    a = gk.cka(x, y, backend="reference")
    b = gk.cka(x, y, backend="auto")
    torch.testing.assert_close(a, b)
    assert gk.resolve_backend("auto", [x]) == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        gk.cka(x, y, backend="nope")


def test_low_precision_reference_upcasts_in_blocks(monkeypatch):
    """bf16 input is shifted and accumulated in fp32 one block at a time: same result with tiny
    blocks, and equal to H x xᵀ H computed in fp64 from the same bf16 values."""
    from guidance_kernels.backends import reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 50, generator=g).bfloat16()
    y = torch.randn(9, 30, generator=g).bfloat16()
    want = ops.gram([x, y], "reference")
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 9 * 7)
    got = ops.gram([x, y], "reference")
    h = torch.eye(9, dtype=torch.float64) - 1 / 9
    for a, b, t in zip(got, want, (x, y)):
        assert a.dtype == torch.float32
        # two fp32 summation orders of p products (then n-term centering sums): within
        # k eps32 of the sum of |terms| of the shifted products, on any BLAS
        t64 = t.double()
        sh = t64 - t64[:1]
        tol = dict(dtype=torch.float32, k=t.shape[1] + 2 * t.shape[0], scale=abs_scale(sh))
        assert_within(a, b, **tol)
        assert_within(a, h @ t64 @ t64.T @ h, **tol)


@pytest.mark.gpu
def test_no_host_sync_in_loss_forward_and_backward_on_cuda():
    x = torch.randn(64, 100, device="cuda", requires_grad=True)
    y = torch.randn(64, 30, device="cuda")
    gk.guidance_loss([x], [y]).backward()  # warm-up (lazy imports, autotune)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for metric in ("cka", "debiased_cka"):
            gk.guidance_loss([x], [y], metric=metric).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
