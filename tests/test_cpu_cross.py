"""The fused feature-form product ``S = z'ᵀz'`` (``z' = [x' y']``, csrc/cpu/cross_shifted.cpp via
backends/cpu_gram.py), its column sums and its backward ``[x' y'] w + 1 vᵀ`` against float64, for every instruction set this CPU
runs (and, with random shapes, the Gram and its backward): feature groups with tails on both sides, row blocks and thread chunks of every kind,
strided input, offset data, a NaN-poisoned output (the padding must come out exactly zero); its
use by the reference backend's ``cross`` and by the feature-form loss. Skipped (with the reason)
where the extension is not built or the CPU has neither AVX-512 nor AVX2: the MKL path it
replaces is tested in tests/test_cpu_syrk.py."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guidance_kernels as gk
from guidance_kernels.backends import cpu_gram, reference
from tolerance import abs_product, assert_entrywise, bound, rel

F32, F64 = torch.float32, torch.float64


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    if cpu_gram._module() is None or request.param not in cpu_gram._module().isas():
        pytest.skip(f"this CPU (or build) does not run the {request.param} kernels")
    return request.param


def _padded_z(x, y):
    """``z'`` in fp64 with each side padded to a multiple of 16 features (the kernel's layout)."""
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    o = 16 * -(-p // 16)
    z = torch.zeros(n, o + 16 * -(-q // 16), dtype=F64)
    z[:, :p] = x.double() - x[:1].double()
    z[:, o : o + q] = y.double() - y[:1].double()
    return z


def _check(x, y, kc, chunks, isa):
    z = _padded_z(x, y)
    m = z.shape[1]
    s, sums = torch.full((m, m), float("nan")), torch.full((m,), float("nan"))  # poison
    cpu_gram._module().cross_shifted_(x, y, s, sums, kc, chunks, isa)
    msg = f"isa={isa} n={x.shape[0]} p={x.shape[1]} q={y.shape[1]} kc={kc} chunks={chunks}"
    assert torch.equal(s, s.T), msg
    k = max(x.shape[0], 1)
    assert_entrywise(s, z.T @ z, abs_product(z.T, z), k=k, msg=msg)
    assert_entrywise(sums, z.sum(0), z.abs().sum(0), k=k, msg=msg + " (sums)")
    pad = torch.ones(m, dtype=torch.bool)
    o = 16 * -(-x.shape[1] // 16)
    pad[: x.shape[1]] = pad[o : o + y.shape[1]] = False
    assert bool((s[pad] == 0).all() and (s[:, pad] == 0).all() and (sums[pad] == 0).all()), msg + " (padding)"


@pytest.mark.parametrize("n", [1, 2, 17, 300])
@pytest.mark.parametrize("p, q", [(1, 1), (16, 16), (17, 5), (33, 48), (7, 70)])
def test_matches_fp64_on_offset_data(n, p, q, isa):
    g = torch.Generator().manual_seed(n * 1000 + p * 10 + q)
    x = (torch.randn(n, p, generator=g, dtype=F64) * 0.5 + 3e3).float()  # ||Kc|| / ||K|| ~ 1e-7
    y = (torch.randn(n, q, generator=g, dtype=F64) * 2 - 40).float()
    for kc, chunks in ((384, 1), (16, 1), (16, 3), (7, 2), (1, 2)):
        _check(x, y, kc, chunks, isa)


def test_strided_inputs_and_many_rows(isa):
    g = torch.Generator().manual_seed(3)
    big = torch.randn(700, 90, generator=g) + 5.0
    _check(big[:, 3:40], big[:, 50:90], 64, 2, isa)  # row stride 90, unaligned starts
    _check(big[::2, :33], torch.randn(350, 20, generator=g), 384, 3, isa)  # row-strided x
    _check(torch.randn(5000, 24, generator=g) - 3.0, torch.randn(5000, 9, generator=g), 384, 2, isa)


def test_no_rows_and_bad_arguments(isa):
    k = cpu_gram._module()
    s, sums = torch.full((32, 32), float("nan")), torch.full((32,), float("nan"))
    k.cross_shifted_(torch.empty(0, 3), torch.empty(0, 4), s, sums, 384, 2, isa)
    assert torch.equal(s, torch.zeros(32, 32)) and torch.equal(sums, torch.zeros(32))  # the product of nothing
    x, y = torch.randn(6, 3), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="cross_shifted_: x has 6 rows but y has 5"):
        k.cross_shifted_(x, torch.randn(5, 4), s, sums, 384, 1, isa)
    with pytest.raises(RuntimeError, match=r"cross_shifted_: out must be .* shape \(32, 32\)"):
        k.cross_shifted_(x, y, torch.empty(7, 7), sums, 384, 1, isa)
    with pytest.raises(RuntimeError, match=r"cross_shifted_: sums must be .* shape \(32\)"):
        k.cross_shifted_(x, y, s, torch.empty(7), 384, 1, isa)
    with pytest.raises(RuntimeError, match="cross_shifted_: y must be a 2-D float32"):
        k.cross_shifted_(x, y.double(), s, sums, 384, 1, isa)
    with pytest.raises(RuntimeError, match="cross_shifted_: x must have unit column stride"):
        k.cross_shifted_(torch.randn(3, 6).T, y, s, sums, 384, 1, isa)


@pytest.mark.skipif(cpu_gram._module() is None, reason="guidance_kernels._cpu not built, no AVX-512 / AVX2, or GK_NO_CPU_KERNEL set")
def test_reference_cross_uses_it_for_fp32_pairs(monkeypatch):
    """fp32 pairs go through the kernel (its blocks sliced out), fp64 / bf16 / transposed ones
    through MKL; a too-large padded ``p + q`` for the threads' private products goes to MKL."""
    calls = []
    real = cpu_gram.cross_
    monkeypatch.setattr(cpu_gram, "cross_", lambda x, y: calls.append(x.dtype) or real(x, y))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 21, generator=g) + 30.0
    y = torch.randn(200, 13, generator=g) - 2.0
    for dtype in (F32, F64, torch.bfloat16):
        xa, ya = x.to(dtype), y.to(dtype)
        a, b, c, sx, sy = (t[0] for t in reference.cross([xa], [ya]))
        xs, ys = xa.double() - xa[:1].double(), ya.double() - ya[:1].double()
        acc = F64 if dtype == F64 else F32
        for got, want, scale in ((a, xs.T @ xs, abs_product(xs.T, xs)), (b, ys.T @ ys, abs_product(ys.T, ys)),
                                 (c, xs.T @ ys, abs_product(xs.T, ys))):
            assert got.shape == want.shape
            assert_entrywise(got, want, scale, k=200, input_dtype=dtype, acc_dtype=acc)
        assert_entrywise(sx, xs.sum(0), xs.abs().sum(0), k=200, input_dtype=dtype, acc_dtype=acc)
        assert_entrywise(sy, ys.sum(0), ys.abs().sum(0), k=200, input_dtype=dtype, acc_dtype=acc)
    assert calls == [F32]
    calls.clear()
    reference.cross([x.T.contiguous().T], [y])  # unit row stride: MKL
    monkeypatch.setattr(cpu_gram, "PRIVATE_BYTES", 0)
    reference.cross([x], [y])
    assert calls == [] or torch.get_num_threads() == 1


@pytest.mark.skipif(cpu_gram._module() is None, reason="guidance_kernels._cpu not built, no AVX-512 / AVX2, or GK_NO_CPU_KERNEL set")
def test_feature_form_loss_and_gradient_match_fp64(monkeypatch):
    """The per-token loss (feature form CKA; debiased CKA's feature form has its own blocked
    path) on offset data through the kernel: value and gradients against the same loss in fp64
    (whose products take the MKL path)."""
    calls = []
    real = cpu_gram.cross_
    monkeypatch.setattr(cpu_gram, "cross_", lambda x, y: calls.append(1) or real(x, y))
    metric = "cka"
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(600, 40, generator=g, dtype=F64) * 0.1 + 20).float().requires_grad_() for _ in range(2)]
    ys = [(torch.randn(600, 24, generator=g, dtype=F64) - 3).float() for _ in range(2)]
    got = gk.guidance_loss(xs, ys, metric=metric, form="feature")
    got.backward()
    assert len(calls) == 2  # one kernel call per pair
    xd = [x.detach().double().requires_grad_() for x in xs]
    want = gk.guidance_loss(xd, [y.double() for y in ys], metric=metric, form="feature")
    want.backward()
    k = 600 + 64 * 64  # fp32 sums over the samples, then over the p x q products
    assert abs(float(got.detach()) - float(want.detach())) <= bound(F32, k) * max(1.0, abs(float(want.detach())))
    for a, b in zip(xs, xd):
        assert rel(a.grad, b.grad) <= bound(F32, k, c=64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 70), p=st.integers(1, 40), q=st.integers(1, 40), kc=st.integers(1, 50), chunks=st.integers(1, 4),
       offset=st.sampled_from([0.0, -7.0, 3e3]), seed=st.integers(0, 2**16))
def test_random_shapes_gram_backward_and_cross(isa, n, p, q, kc, chunks, offset, seed):
    """Every kernel of the table on random shapes and blockings (n = 0 and 1 included for the
    feature form; the Gram and backward need n >= 1)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, p, generator=g, dtype=F64) + offset).float()
    y = (torch.randn(n, q, generator=g, dtype=F64) - offset).float()
    _check(x, y, kc, chunks, isa)
    if n == 0:
        return
    k = cpu_gram._module()
    xs = x.double() - x[:1].double()
    got = torch.full((n, n), float("nan"))
    k.gram_shifted_(x, got, kc, chunks, torch.empty(0), isa)
    assert_entrywise(got, xs @ xs.T, abs_product(xs, xs.T), k=p, msg=f"gram {isa} n={n} p={p} kc={kc}")
    m = torch.randn(n, n, generator=g)
    dx = torch.full((n, p), float("nan"))
    k.gram_backward_shifted_(m, x, dx, kc, chunks, isa)
    assert_entrywise(dx, m.double() @ xs, abs_product(m, xs), k=n, msg=f"backward {isa} n={n} p={p} kc={kc}")
    _check_backward(x, y, chunks, isa, g)


def _check_backward(x, y, chunks, isa, g):
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    w, v = torch.randn(p + q, p, generator=g), torch.randn(p, generator=g)
    dx = torch.full((n, p), float("nan"))  # poison
    cpu_gram._module().cross_backward_shifted_(x, y, w, v, dx, chunks, isa)
    z = torch.cat([x.double() - x[:1].double(), y.double() - y[:1].double(), torch.ones(n, 1, dtype=F64)], 1)
    wv = torch.cat([w.double(), v.double()[None]])
    assert_entrywise(dx, z @ wv, abs_product(z, wv), k=p + q + 1, msg=f"isa={isa} n={n} p={p} q={q} chunks={chunks}")


@pytest.mark.parametrize("n", [1, 5, 6, 7, 8, 9, 17, 300])
@pytest.mark.parametrize("p, q", [(1, 1), (15, 2), (16, 16), (17, 5), (47, 48), (49, 3)])
def test_backward_matches_fp64_on_offset_data(n, p, q, isa):
    """``dx = [x' y'] w + 1 vᵀ`` over edge row panels (n not a multiple of the tile's 8 / 6 rows),
    column tails (p not a multiple of its 48 / 16 columns) and thread chunks."""
    g = torch.Generator().manual_seed(n * 1000 + p * 10 + q + 7)
    x = (torch.randn(n, p, generator=g, dtype=F64) * 0.5 + 3e3).float()
    y = (torch.randn(n, q, generator=g, dtype=F64) * 2 - 40).float()
    for chunks in (1, 2, 5):
        _check_backward(x, y, chunks, isa, g)


def test_backward_strided_and_bad_arguments(isa):
    g = torch.Generator().manual_seed(8)
    big = torch.randn(300, 90, generator=g) + 5.0
    _check_backward(big[:, 3:40], big[:, 50:90], 2, isa, g)
    k = cpu_gram._module()
    x, y, dx = torch.randn(6, 3), torch.randn(6, 4), torch.empty(6, 3)
    with pytest.raises(RuntimeError, match=r"cross_backward_shifted_: w must be .* shape \(7, 3\)"):
        k.cross_backward_shifted_(x, y, torch.empty(3, 7), torch.empty(3), dx, 1, isa)
    with pytest.raises(RuntimeError, match=r"cross_backward_shifted_: v must be .* shape \(3\)"):
        k.cross_backward_shifted_(x, y, torch.empty(7, 3), torch.empty(4), dx, 1, isa)
    with pytest.raises(RuntimeError, match="cross_backward_shifted_: y must be a 2-D float32"):  # names its own op
        k.cross_backward_shifted_(x, y.double(), torch.empty(7, 3), torch.empty(3), dx, 1, isa)
    with pytest.raises(RuntimeError, match=r"cross_backward_shifted_: dx must be .* \(6, 3\)"):
        k.cross_backward_shifted_(x, y, torch.empty(7, 3), torch.empty(3), torch.empty(3, 6).T, 1, isa)


@pytest.mark.skipif(cpu_gram._module() is None, reason="guidance_kernels._cpu not built, no AVX-512 / AVX2, or GK_NO_CPU_KERNEL set")
def test_reference_cross_backward_uses_it_for_fp32_pairs(monkeypatch):
    calls = []
    real = cpu_gram.cross_backward_
    monkeypatch.setattr(cpu_gram, "cross_backward_", lambda *a: calls.append(a[1].dtype) or real(*a))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(200, 21, generator=g) + 30.0
    y = torch.randn(200, 13, generator=g) - 2.0
    m, nm, v = torch.randn(21, 21, generator=g), torch.randn(13, 21, generator=g), torch.randn(21, generator=g)
    for dtype in (F32, F64, torch.bfloat16):
        xa, ya = x.to(dtype), y.to(dtype)
        acc = F64 if dtype == F64 else F32
        dx = reference.cross_backward([xa], [m.to(acc)], [ya], [nm.to(acc)], [v.to(acc)])[0]
        assert dx.dtype == dtype
        z = torch.cat([xa.double() - xa[:1].double(), ya.double() - ya[:1].double(), torch.ones(200, 1, dtype=F64)], 1)
        wv = torch.cat([m.to(acc).double(), nm.to(acc).double(), v.to(acc).double()[None]])
        assert_entrywise(dx, z @ wv, abs_product(z, wv), k=35, input_dtype=dtype, acc_dtype=acc)
    assert calls == [F32]


def test_float64_default_dtype_keeps_the_kernels_working():
    """The kernels' buffers are fp32 whatever ``torch.get_default_dtype()`` is (a fresh process:
    the first-use self-test runs under the fp64 default too)."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_default_dtype(torch.float64)\n"
        "from guidance_kernels.backends import cpu_gram, reference\n"
        "x, y = torch.randn(50, 20, dtype=torch.float32) + 3, torch.randn(50, 9, dtype=torch.float32)\n"
        "a = reference.cross([x], [y])[0][0]; k = reference.gram([x])[0]\n"
        "d = reference.gram_backward([torch.ones(50, 50, dtype=torch.float32)], [x])[0]\n"
        "xs = x.double() - x[:1].double()\n"
        "ok = [torch.allclose(a.double(), xs.T @ xs, rtol=1e-4, atol=1e-3), torch.allclose(k.double(), xs @ xs.T, rtol=1e-4, atol=1e-3),\n"
        "      torch.allclose(d.double(), torch.ones(50, 50, dtype=torch.float64) @ xs, rtol=1e-4, atol=1e-3)]\n"
        "print(cpu_gram.isa(), all(ok))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    want = f"{cpu_gram.isa()} True"
    assert out.stdout.strip() == want, out.stdout + out.stderr
