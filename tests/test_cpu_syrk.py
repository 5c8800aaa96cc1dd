"""The CPU symmetric rank-k update (backends/cpu_syrk.py) against a GEMM, and the reference
backend's Grams with and without it against the fp64 reference, on offset data where
||Kc|| / ||K|| ~ 1e-7 (the row shift must keep them exact)."""

import subprocess
import sys

import pytest
import torch

from guidance_kernels.backends import cpu_syrk, reference
from tolerance import abs_product, assert_entrywise

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("transposed", [False, True])
def test_syrk_matches_gemm_on_strided_blocks(dtype, transposed):
    """``syrk_lower_`` (``a aᵀ``) over two column blocks, ``syrk_t_lower_`` (``aᵀ a``) over two row
    blocks of a column slice: strided views, no copy; beta = 0 then 1; one triangle written."""
    if not cpu_syrk.available(dtype):
        pytest.skip("no MKL ?syrk in this PyTorch build (the GEMM fallback is tested below)")
    g = torch.Generator().manual_seed(0)
    big = torch.randn(40, 50, generator=g, dtype=dtype)
    if transposed:
        z, fn = big[:, 2:25], cpu_syrk.syrk_t_lower_
        parts, want = (z[:17], z[17:]), z.double().T @ z.double()
    else:
        z, fn = big[:, 3:47], cpu_syrk.syrk_lower_
        parts, want = (z[:, :17], z[:, 17:]), z.double() @ z.double().T
    m = want.shape[0]
    c = torch.full((m, m), float("nan"), dtype=dtype)
    fn(c, parts[0], 0.0)  # beta = 0 ignores the (NaN) contents
    fn(c, parts[1], 1.0)
    iu = torch.triu_indices(m, m, 1)
    assert torch.isnan(c[iu[0], iu[1]]).all()  # the strict upper triangle is not touched
    c = cpu_syrk.mirror_lower(c)
    scale = abs_product(z.T, z) if transposed else abs_product(z, z.T)
    assert_entrywise(c, want, scale, k=44, acc_dtype=dtype, input_dtype=dtype)


def _offset_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 700, generator=g, dtype=F64) + 3e3  # ||Kc|| / ||K|| ~ 1e-7
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
def test_reference_gram_exact_on_offset_data(dtype, sym, monkeypatch):
    """The MKL paths (the fused AVX-512 / AVX2 kernels are switched off here: tests/test_cpu_gram.py)."""
    monkeypatch.setattr(reference.cpu_gram, "gram_available", lambda x: False)
    if not sym:
        monkeypatch.setattr(cpu_syrk, "available", lambda dtype: False)
    monkeypatch.setattr(reference, "_SYRK_BLOCK_ELEMS", 24 * 256)  # several blocks
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 24 * 256)
    x = _offset_inputs(dtype)
    got = reference.gram([x])[0]
    xs = x.double() - x[0].double()  # the shifted rows, exact in fp64
    want = xs @ xs.T
    acc = F64 if dtype == F64 else F32
    assert got.dtype == acc and torch.equal(got, got.T)
    assert_entrywise(got, want, abs_product(xs, xs.T), k=700, acc_dtype=acc, input_dtype=acc)


def test_env_switch_disables_mkl_syrk():
    code = "import torch; from guidance_kernels.backends import cpu_syrk; print(cpu_syrk.available(torch.float32))"
    env = {**__import__("os").environ, "GK_NO_MKL_SYRK": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
def test_reference_cross_and_backward_exact_on_offset_data(dtype, sym, monkeypatch):
    """Feature-space products ``[x' y']ᵀ[x' y']`` over several row blocks (one ``?syrk`` each, or
    GEMMs) and ``dx = [x' y'] [m; nm] + v`` written into dx's rows, against fp64."""
    if not sym:
        monkeypatch.setattr(cpu_syrk, "available", lambda dtype: False)
    monkeypatch.setattr(reference, "_SYRK_BLOCK_ELEMS", 5 * 19)  # blocks of 5 rows
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 5 * 19)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(33, 11, generator=g, dtype=F64) + 3e3).to(dtype)
    y = (torch.randn(33, 8, generator=g, dtype=F64) - 2e3).to(dtype)
    a, b, c, sx, sy = (t[0] for t in reference.cross([x], [y]))
    xs, ys = x.double() - x[0].double(), y.double() - y[0].double()
    acc = F64 if dtype == F64 else F32
    for got, u, v in ((a, xs, xs), (b, ys, ys), (c, xs, ys)):
        assert got.dtype == acc
        assert_entrywise(got, u.T @ v, abs_product(u.T, v), k=33, acc_dtype=acc, input_dtype=acc)
    assert_entrywise(sx, xs.sum(0), xs.abs().sum(0), k=33, acc_dtype=acc, input_dtype=acc)
    assert_entrywise(sy, ys.sum(0), ys.abs().sum(0), k=33, acc_dtype=acc, input_dtype=acc)
    m, nm, vv = (torch.randn(*s, generator=g, dtype=F64).to(acc) for s in ((11, 11), (8, 11), (11,)))
    dx = reference.cross_backward([x], [m], [y], [nm], [vv])[0]
    want = xs @ m.double() + ys @ nm.double() + vv.double()
    scale = xs.abs() @ m.double().abs() + ys.abs() @ nm.double().abs() + vv.double().abs()
    assert dx.dtype == dtype
    assert_entrywise(dx, want, scale, k=19, acc_dtype=acc, input_dtype=dtype)


def test_in_place_centring_is_bit_for_bit_the_out_of_place_one():
    from guidance_kernels.metrics import center_gram, center_gram_

    g = torch.Generator().manual_seed(4)
    for dtype in (F32, F64):
        a = torch.randn(3, 9, 40, generator=g, dtype=dtype) + 5.0
        k = a @ a.mT
        assert torch.equal(center_gram_(k.clone()), center_gram(k))
