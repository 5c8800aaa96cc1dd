"""pytest-benchmark view of the bench suite: the same workloads and implementations as
``guidance-kernels bench`` (imported from ``guidance_kernels.bench``; no sizes here).

    pytest bench/ --benchmark-only                         # quick shapes on the default device
    GK_BENCH_SCALE=1 GK_BENCH_DEVICE=cuda pytest bench/ --benchmark-only --benchmark-autosave
    pytest bench/ --benchmark-only --benchmark-compare     # against the last saved run

Environment: ``GK_BENCH_SCALE`` (default: the --quick scale), ``GK_BENCH_DEVICE`` (default
cuda if available, else cpu), ``GK_BENCH_DTYPE`` (bf16), ``GK_BENCH_MAX_CALL_S`` (skip
implementations estimated slower than this per call; default 1 s, 30 s at scale 1).
Each test first checks the implementation against the fp64 truth (a wrong one fails, untimed).
"""

from __future__ import annotations

import os

import pytest
import torch

from guidance_kernels.bench import baselines
from guidance_kernels.bench.ceilings import measure_ceilings
from guidance_kernels.bench.runner import DTYPES, _check, _calls, _Truth
from guidance_kernels.bench.timing import sync
from guidance_kernels.bench.workloads import QUICK_SCALE, WORKLOADS, get_workloads

SCALE = float(os.environ.get("GK_BENCH_SCALE", QUICK_SCALE))
DEVICE = torch.device(os.environ.get("GK_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = DTYPES[os.environ.get("GK_BENCH_DTYPE", "bf16")]
MAX_CALL_S = float(os.environ.get("GK_BENCH_MAX_CALL_S", 30.0 if SCALE >= 1 else 1.0))
IMPLS = {i.name: i for i in baselines.implementations()}


@pytest.fixture(scope="session")
def matmul_rate():
    c = measure_ceilings(DEVICE, DTYPE, quick=True)
    return c.matmul_flops_per_s, c.matmul_rates


@pytest.fixture(scope="module", params=list(WORKLOADS))
def workload(request):
    w = get_workloads([request.param], SCALE)[0]
    xs, ys = w.make_inputs(DEVICE, DTYPE)
    return w, xs, ys, _Truth(xs, ys)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_workload(benchmark, workload, impl_name, mode, matmul_rate):
    w, xs, ys, truth = workload
    impl = IMPLS[impl_name]
    why = impl.why_unavailable(DEVICE)
    if why is not None:
        pytest.skip(why)
    if mode == "fwd+bwd" and not impl.differentiable:
        pytest.skip("not differentiable: forward / analysis only")
    est = baselines.est_seconds(impl, w, *matmul_rate)
    if est > MAX_CALL_S:
        pytest.skip(f"estimated {est:.3g} s per call > {MAX_CALL_S:g}")
    fn = impl.make(w, {"compile_scope": "pair"})
    chk = _check(impl, fn, mode, xs, ys, truth, DTYPE)
    assert chk["ok"], chk
    call = _calls(fn, mode, impl.differentiable)

    def run():
        out = call(xs, ys)
        sync(DEVICE)
        return out

    benchmark.group = f"{w.name} {mode}"
    benchmark.extra_info.update(workload=w.name, shapes=w.summary(), impl=impl.name, mode=mode, scale=SCALE)
    benchmark.pedantic(run, warmup_rounds=1, rounds=5 if SCALE < 1 else 20, iterations=1)
