"""The fused row-shifted Gram and its backward (csrc/cpu/gram_shifted.cpp via backends/cpu_gram.py)
against the fp64 reference, for every instruction set this CPU runs (AVX-512 and AVX2 + FMA on
an AVX-512 machine, AVX2 alone on e.g. AMD Zen 3): edge groups (n not a multiple of 16), column
blocks and thread chunks of every kind, strided input, offset data where ||Kc|| / ||K|| ~ 1e-7, a
NaN-poisoned output; and its use by the reference backend. Skipped (with the reason) where the
extension is not built or the CPU has neither: the MKL path it replaces is tested in
tests/test_cpu_syrk.py."""

import subprocess
import sys

import pytest
import torch

from guidance_kernels.backends import cpu_gram, reference
from tolerance import abs_product, assert_entrywise

F32, F64 = torch.float32, torch.float64

needs_kernel = pytest.mark.skipif(
    cpu_gram._module() is None, reason="guidance_kernels._cpu not built, no AVX-512 / AVX2, or GK_NO_CPU_KERNEL set"
)


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    """Each instruction set's kernels, where this CPU runs them."""
    if cpu_gram._module() is None or request.param not in cpu_gram._module().isas():
        pytest.skip(f"this CPU (or build) does not run the {request.param} kernels")
    return request.param


def _check(x: torch.Tensor, kc: int, chunks: int, isa: str = "") -> None:
    n = x.shape[0]
    got = torch.full((n, n), float("nan"))  # poison: every entry must be written
    cpu_gram._module().gram_shifted_(x, got, kc, chunks, torch.empty(0), isa)
    xs = x.double() - x[:1].double()  # the shifted rows, exact in fp64
    assert torch.equal(got, got.T), "not symmetric"
    msg = f"isa={isa} n={n} p={x.shape[1]} kc={kc} chunks={chunks}"
    assert_entrywise(got, xs @ xs.T, abs_product(xs, xs.T), k=max(x.shape[1], 1), msg=msg)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 40])
@pytest.mark.parametrize("p", [1, 7, 16, 33, 300])
def test_matches_fp64_on_offset_data(n, p, isa):
    g = torch.Generator().manual_seed(n * 1000 + p)
    x = (torch.randn(n, p, generator=g, dtype=F64) * 0.5 + 3e3).float()  # ||Kc|| / ||K|| ~ 1e-7
    for kc, chunks in ((384, 1), (16, 1), (16, 3), (7, 2), (384, 2), (9, 1)):
        _check(x, kc, chunks, isa)


def test_strided_input_and_wide_rows(isa):
    """A column slice of a wider tensor (row stride > p, unaligned start) and a long row."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(33, 1000, generator=g) - 7.0
    _check(big[:, 3:930], 128, 2, isa)
    _check(big[5:, 1:], 384, 2, isa)
    _check(torch.randn(3, 20000, generator=g) + 1e3, 384, 2, isa)


def test_no_columns_constant_rows_and_nan(isa):
    k = cpu_gram._module()
    z = torch.full((5, 5), float("nan"))
    k.gram_shifted_(torch.empty(5, 0), z, 384, 2, torch.empty(0), isa)
    assert torch.equal(z, torch.zeros(5, 5))  # the Gram of nothing
    c = torch.full((20, 50), 3.25)  # constant rows: the shift makes them exactly zero
    out = torch.full((20, 20), float("nan"))
    k.gram_shifted_(c, out, 384, 2, torch.empty(0), isa)
    assert torch.equal(out, torch.zeros(20, 20))
    x = torch.randn(20, 50)
    x[4, 7] = float("nan")
    k.gram_shifted_(x, out, 384, 2, torch.empty(0), isa)
    assert torch.isnan(out[4]).all() and torch.isnan(out[:, 4]).all()  # NaN stays visible
    assert not torch.isnan(out[:4, :4]).any()


@needs_kernel
def test_bad_arguments_name_the_problem():
    k = cpu_gram._module()
    with pytest.raises(RuntimeError, match="gram_shifted_.*float32"):
        k.gram_shifted_(torch.randn(4, 5, dtype=F64), torch.empty(4, 4), 384, 1, torch.empty(0))
    with pytest.raises(RuntimeError, match="gram_shifted_.*unit column stride"):
        k.gram_shifted_(torch.randn(5, 4).T, torch.empty(4, 4), 384, 1, torch.empty(0))
    with pytest.raises(RuntimeError, match="gram_shifted_.*range"):
        k.gram_shifted_(torch.randn(4, 5), torch.empty(4, 4), 384, 1, torch.empty(3))
    with pytest.raises(RuntimeError, match=r"gram_shifted_.*shape \(4, 4\)"):
        k.gram_shifted_(torch.randn(4, 5), torch.empty(5, 5), 384, 1, torch.empty(0))
    with pytest.raises(RuntimeError, match=r"gram_backward_shifted_: isa 'sse9' is not run .* it runs: avx"):
        k.gram_backward_shifted_(torch.randn(4, 4), torch.randn(4, 6), torch.empty(4, 6), 512, 1, "sse9")
    assert cpu_gram.isa() == k.isas()[0] and set(k.isas()) <= {"avx512", "avx2"}


@needs_kernel
def test_reference_backend_uses_it_for_fp32_only(monkeypatch):
    """fp32 layers go through the kernel, fp64 / bf16 / transposed / too-large-n ones through
    MKL; a mixed stack is right everywhere (the MKL layers are mirrored, the fused ones are not
    touched)."""
    calls = []
    real = cpu_gram.gram_
    monkeypatch.setattr(cpu_gram, "gram_", lambda out, x: calls.append(x.shape) or real(out, x))
    g = torch.Generator().manual_seed(6)
    a = torch.randn(24, 300, generator=g) + 50.0
    b = torch.randn(300, 24, generator=g).T  # unit row stride: the MKL path
    for dtype in (F64, torch.bfloat16):
        reference.gram([a.to(dtype)])
    assert calls == []
    got = reference.gram([a, b, a[:, :100]])
    assert calls == [(24, 300), (24, 100)]
    for k, x in zip(got, (a, b, a[:, :100])):
        xs = x.double() - x[:1].double()
        assert_entrywise(k, xs @ xs.T, abs_product(xs, xs.T), k=300)
    monkeypatch.setattr(cpu_gram, "MAX_N", 16)
    calls.clear()
    reference.gram([a])
    assert calls == []


@needs_kernel
def test_many_threads_and_large_n_leave_the_gram_to_mkl(monkeypatch):
    """The extra threads' private Grams must fit in PRIVATE_BYTES, else MKL computes the Gram
    (the backward, which has no private output, still uses its kernel)."""
    x = torch.randn(24, 300) + 5.0
    assert cpu_gram.gram_available(x)
    monkeypatch.setattr(cpu_gram, "PRIVATE_BYTES", 4 * 24 * 24 * max(torch.get_num_threads() - 1, 0) - 1)
    assert cpu_gram.available(x) and not cpu_gram.gram_available(x)
    calls = []
    monkeypatch.setattr(cpu_gram, "gram_", lambda out, x: calls.append(1))
    k = reference.gram([x])[0]
    xs = x.double() - x[:1].double()
    assert calls == []
    assert_entrywise(k, xs @ xs.T, abs_product(xs, xs.T), k=300)


def test_check_command_names_the_kernels_in_use():
    from typer.testing import CliRunner

    from guidance_kernels.cli import app

    out = CliRunner().invoke(app, ["check", "--n", "16"])
    assert out.exit_code == 0, out.output
    want = f"CPU kernels: {cpu_gram.isa()}" if cpu_gram.isa() else "CPU kernels: not in use"
    assert want in out.output


@needs_kernel
def test_a_table_that_disagrees_is_skipped(monkeypatch):
    """The first-use self-test runs per instruction set: one that fails is passed over for the
    next (AVX-512 -> AVX2), and none passing turns the kernels off (MKL computes the products)."""
    isas = cpu_gram._module().isas()
    real = cpu_gram._verify
    try:
        cpu_gram._verified.cache_clear()
        monkeypatch.setattr(cpu_gram, "_verify", lambda m, name: name != isas[0] and real(m, name))
        assert cpu_gram.isa() == (isas[1] if len(isas) > 1 else None)
        cpu_gram._verified.cache_clear()
        monkeypatch.setattr(cpu_gram, "_verify", lambda m, name: False)
        assert cpu_gram.isa() is None and not cpu_gram.available(torch.ones(4, 4))
    finally:
        monkeypatch.undo()
        cpu_gram._verified.cache_clear()
    assert cpu_gram.isa() == isas[0]


def test_env_switch_disables_the_kernel():
    code = "import torch; from guidance_kernels.backends import cpu_gram; print(cpu_gram.available(torch.ones(4, 4)))"
    env = {**__import__("os").environ, "GK_NO_CPU_KERNEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_range_is_min_and_max_of_x(isa):
    """The min / max read while packing (the scale check's input) over edge groups, column tails
    and thread chunks; an empty x gives (inf, -inf)."""
    g = torch.Generator().manual_seed(7)
    k = cpu_gram._module()
    for n, p, kc, chunks in ((17, 300, 16, 3), (1, 5, 384, 1), (40, 1000, 128, 2), (33, 33, 7, 2)):
        x = torch.randn(n, p, generator=g) * 3 + 1
        x[n - 1, p - 1] = 1e3  # in the last (masked) lanes
        rng = torch.full((2,), float("nan"))
        k.gram_shifted_(x, torch.empty(n, n), kc, chunks, rng, isa)
        assert torch.equal(rng, torch.stack(torch.aminmax(x))), (n, p, kc, chunks)
        x[n - 1, p - 1] = -1e3  # the minimum in the masked lanes
        k.gram_shifted_(x, torch.empty(n, n), kc, chunks, rng, isa)
        assert torch.equal(rng, torch.stack(torch.aminmax(x))), (n, p, kc, chunks)
    rng = torch.full((2,), float("nan"))
    k.gram_shifted_(torch.empty(4, 0), torch.empty(4, 4), 384, 2, rng, isa)
    assert rng.tolist() == [float("inf"), float("-inf")]


def _scores_and_grads(fn, xs, ys):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(xs, ys)
    out.sum().backward()
    return out.detach(), [x.grad for x in xs]


@needs_kernel
@pytest.mark.parametrize("metric", ["cka", "debiased_cka"])
def test_scale_check_read_by_the_kernel_is_bit_for_bit(metric, monkeypatch):
    """CPU, every member to the fused kernel: no min/max pass (``rescale_all`` is not called),
    and scores, CKA maps and gradients equal the ``rescale_all`` path bit for bit; extreme
    magnitudes (``1e20``, ``1e-20``) fall back to ``rescale_all``, equal to it too (an all-zero
    member has factor 1 on both paths)."""
    import guidance_kernels as gk
    from guidance_kernels import functional

    calls = []
    real = functional._scaling.rescale_all
    monkeypatch.setattr(functional._scaling, "rescale_all", lambda xs: calls.append(len(xs)) or real(xs))
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(40, 300, generator=g) + 2.0, torch.randn(40, 70, generator=g)]
    ys = [torch.randn(40, 50, generator=g), torch.randn(40, 90, generator=g) * 1e-3]
    loss = lambda a, b: gk.guidance_loss(a, b, metric=metric, form="sample", reduction="none")  # noqa: E731
    cmap = lambda a, b: gk.cka_matrix(a, b, debiased=metric == "debiased_cka")  # noqa: E731
    cases = [(xs, ys, 0), ([xs[0] * 1e20, xs[1]], ys, 1), (xs, [ys[0], ys[1] * 1e-17], 1), ([xs[0], xs[1] * 0], ys, 0)]
    for fn in (loss, cmap):
        for a, b, rescaled in cases:
            calls.clear()
            fast = _scores_and_grads(fn, a, b)
            assert len(calls) == rescaled, calls
            with monkeypatch.context() as m:
                m.setattr(functional, "_unscaled_cpu", lambda *args: None)  # always rescale_all
                slow = _scores_and_grads(fn, a, b)
            assert torch.equal(fast[0], slow[0])
            for ga, gb in zip(fast[1], slow[1]):
                assert torch.equal(ga, gb)


@needs_kernel
def test_feature_form_and_procrustes_keep_the_min_max_pass(monkeypatch):
    import guidance_kernels as gk
    from guidance_kernels import functional

    seen = []
    monkeypatch.setattr(cpu_gram, "recording_ranges", lambda: seen.append(1) or pytest.fail("no fast path here"))
    x, y = torch.randn(300, 8), torch.randn(300, 6)
    gk.guidance_loss([x], [y], form="feature")
    gk.guidance_loss([x], [y], metric="procrustes")
    assert seen == [] and functional._unscaled_cpu([x.double()], "reference", lambda: 1) is None


def _check_backward(m: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, kc: int, chunks: int, isa: str = "") -> None:
    dx.fill_(float("nan"))  # poison: every entry must be written
    cpu_gram._module().gram_backward_shifted_(m, x, dx, kc, chunks, isa)
    xs = x.double() - x[:1].double()
    assert_entrywise(dx, m.double() @ xs, abs_product(m, xs), k=x.shape[0],
                     msg=f"isa={isa} n={x.shape[0]} p={x.shape[1]} kc={kc} chunks={chunks}")


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 8, 9, 13, 40, 300])
@pytest.mark.parametrize("p", [1, 7, 15, 16, 17, 33, 47, 48, 49, 300])
def test_backward_matches_fp64_on_offset_data(n, p, isa):
    """``dX = M x'`` over edge panels (n not a multiple of the tile's 8 / 6 rows), column tails
    (p not a multiple of its 48 / 16 columns), several column blocks and thread chunks."""
    g = torch.Generator().manual_seed(n * 1000 + p + 1)
    x = (torch.randn(n, p, generator=g, dtype=F64) * 0.5 + 3e3).float()
    m = torch.randn(n, n, generator=g)
    for kc, chunks in ((512, 1), (32, 2), (7, 3)):
        _check_backward(m, x, torch.empty(n, p), kc, chunks, isa)


def test_backward_two_row_slabs(isa):
    """n above the kernel's slab (2048 rows of x' per pass): the second slab adds into dX."""
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(2100, 50, generator=g, dtype=F64) * 0.5 - 40.0).float()
    m = torch.randn(2100, 2100, generator=g)
    _check_backward(m, x, torch.empty(2100, 50), 512, 2, isa)


def test_backward_strided_input_and_output(isa):
    """x a column slice (unaligned start), dx a column slice of a wider tensor (row stride > p,
    unaligned: no streaming stores), and a contiguous aligned dx (streaming stores)."""
    g = torch.Generator().manual_seed(9)
    big = torch.randn(40, 1000, generator=g) - 7.0
    m = torch.randn(40, 40, generator=g)
    out = torch.empty(40, 1003)
    out[:, 0] = 5.0
    _check_backward(m, big[:, 3:930], out[:, 1:928], 512, 2, isa)
    assert bool((out[:, 0] == 5.0).all())  # outside dx: untouched
    from guidance_kernels.backends import cpu_pages

    _check_backward(m, big[:, :512], cpu_pages.empty((40, 512), torch.float32), 128, 2, isa)


@needs_kernel
def test_backward_bad_arguments_and_reference_use(monkeypatch):
    k = cpu_gram._module()
    with pytest.raises(RuntimeError, match=r"gram_backward_shifted_.*m must be .* shape \(4, 4\)"):
        k.gram_backward_shifted_(torch.randn(5, 5), torch.randn(4, 6), torch.empty(4, 6), 512, 1)
    with pytest.raises(RuntimeError, match="gram_backward_shifted_.*dx must be"):
        k.gram_backward_shifted_(torch.randn(4, 4), torch.randn(4, 6), torch.empty(6, 4).T, 512, 1)
    calls = []
    real = cpu_gram.gram_backward_
    monkeypatch.setattr(cpu_gram, "gram_backward_", lambda dx, m, x: calls.append(x.dtype) or real(dx, m, x))
    g = torch.Generator().manual_seed(10)
    x = torch.randn(24, 300, generator=g) + 5.0
    m = torch.randn(24, 24, generator=g, dtype=F64)  # cast to fp32 by the backend
    for dtype in (F32, F64, torch.bfloat16):
        dx = reference.gram_backward([m], [x.to(dtype)])[0]
        assert dx.dtype == dtype
        xs = x.to(dtype).double() - x.to(dtype)[:1].double()
        mm = m.to(F64 if dtype == F64 else F32).double()
        assert_entrywise(dx, mm @ xs, abs_product(mm, xs), k=24, input_dtype=dtype, acc_dtype=F64 if dtype == F64 else F32)
    assert calls == [F32]
