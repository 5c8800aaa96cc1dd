"""``guidance-kernels bench --part scaling``: cost curves of the loss (fwd+bwd) and ``cka_matrix``
while the sample count ``n``, the feature count ``p`` (= ``q``) and the number of layer pairs
``L`` grow, one axis at a time from a base point (5 points each).

Every row is also reported against the floor measured in the same run: the flops of the call
counted as full GEMMs (``2 m k n`` per product, no credit for symmetry) divided by the rate of
a large square fp32 matmul. ``pct_floor = floor / time * 100`` (above 100 % is possible: a Gram
through a symmetric update needs half a GEMM's flops). For each axis and call the exponent of
``time ∝ axis^k`` is fitted by least squares in log-log space.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from guidance_kernels.bench.timing import measure
from guidance_kernels.planning import choose_form

__all__ = ["SWEEPS", "run_scaling", "plot_scaling", "write_scaling"]

# base point and the values of each axis: full size, and --quick (CI smoke) size
SWEEPS = {
    False: {"base": {"n": 256, "p": 4096, "L": 4},
            "n": [64, 128, 256, 512, 1024], "p": [1024, 2048, 4096, 8192, 16384], "L": [1, 2, 4, 8, 16]},
    True: {"base": {"n": 16, "p": 64, "L": 2},
           "n": [8, 16, 32, 64, 128], "p": [16, 32, 64, 128, 256], "L": [1, 2, 3, 4, 5]},
}


def _pair_flops(n: int, p: int, q: int) -> float:
    """Full-GEMM flops of one pair's loss forward and backward (target side) in the form the
    cost model picks: Grams ``2n²p + 2n²q`` and ``dX = 2 G X`` (``2n²p``), or the feature-space
    products ``2n(p² + q² + pq)`` and ``dX = X m + Y nm`` (``2n(p² + pq)``)."""
    if choose_form(n, p, q) == "sample":
        return 2.0 * n * n * (2 * p + q)
    return 2.0 * n * (2 * p * p + q * q + 2 * p * q)


def _matrix_flops(n: int, p: int, L: int) -> float:
    """Full-GEMM flops of ``cka_matrix`` of L x L inputs (n, p): 2L Grams and the L x L product."""
    return 2.0 * n * n * p * 2 * L + 2.0 * L * L * n * n


def gemm_rate(device: torch.device, m: int, budget_s: float) -> float:
    """fp32 flop/s of an ``m x m x m`` matmul (the floor's rate), measured now."""
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    return 2.0 * m**3 / measure(lambda: a @ b, [()], device, warmup=2, min_reps=5, budget_s=budget_s).median_s


def _inputs(n: int, p: int, L: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, p, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(L)]
    ys = [torch.randn(n, p, generator=g).to(device=device, dtype=dtype) for _ in range(L)]
    return xs, ys


def _calls(backend: str) -> dict[str, Callable]:
    import guidance_kernels as gk

    def loss(xs, ys):
        gk.guidance_loss(xs, ys, backend=backend).backward()
        for x in xs:
            x.grad = None

    def matrix(xs, ys):
        with torch.no_grad():
            gk.cka_matrix(xs, ys, backend=backend)

    return {"loss fwd+bwd": loss, "cka_matrix": matrix}


def fit_exponent(xs: list[float], ts: list[float]) -> float:
    """Least-squares slope of ``log t`` against ``log x``."""
    lx, lt = [math.log(v) for v in xs], [math.log(v) for v in ts]
    mx, mt = sum(lx) / len(lx), sum(lt) / len(lt)
    return sum((a - mx) * (b - mt) for a, b in zip(lx, lt)) / sum((a - mx) ** 2 for a in lx)


def run_scaling(device: torch.device, dtype: torch.dtype, quick: bool, backend: str = "auto",
                budget_s: Optional[float] = None, log: Callable = print) -> dict:
    """Time both calls over the three sweeps; returns a JSON-ready dict (see module doc)."""
    sweep = SWEEPS[quick]
    budget = budget_s if budget_s is not None else (0.05 if quick else 0.5)
    m = 512 if quick else 2048
    rates = []  # the GEMM rate, measured before each sweep and at the end: the floor uses the
    rows = []  # fastest (a loaded machine slows the GEMM too; the fastest is the honest floor)
    for axis in ("n", "p", "L"):
        rates.append(gemm_rate(device, m, budget))
        log(f"fp32 GEMM rate: {rates[-1] / 1e9:.1f} GFLOP/s")
        for v in sweep[axis]:
            pt = {**sweep["base"], axis: v}
            xs, ys = _inputs(pt["n"], pt["p"], pt["L"], dtype, device)
            flops = {"loss fwd+bwd": pt["L"] * _pair_flops(pt["n"], pt["p"], pt["p"]),
                     "cka_matrix": _matrix_flops(pt["n"], pt["p"], pt["L"])}
            for call, fn in _calls(backend).items():
                t = measure(fn, [(xs, ys)], device, warmup=1, min_reps=3, budget_s=budget)
                rows.append({"axis": axis, **pt, "call": call, "median_s": t.median_s, "p20_s": t.p20_s,
                             "p80_s": t.p80_s, "reps": t.reps, "flops_full_gemm": flops[call]})
                log(f"{axis}={v:>6} {call:<13} {t.median_s * 1e3:9.2f} ms")
    rates.append(gemm_rate(device, m, budget))
    rate = max(rates)
    log(f"floor rate (fastest of {[round(r / 1e9, 1) for r in rates]} GFLOP/s): {rate / 1e9:.1f}")
    for r in rows:
        r["floor_s"] = r["flops_full_gemm"] / rate
        r["pct_floor"] = 100.0 * r["floor_s"] / r["median_s"]
        log(f"{r['axis']}={r[r['axis']]:>6} {r['call']:<13} {r['median_s'] * 1e3:9.2f} ms  {r['pct_floor']:6.1f} % of floor")
    fits = {}
    for axis in ("n", "p", "L"):
        for call in _calls(backend):
            sel = [r for r in rows if r["axis"] == axis and r["call"] == call]
            fits[f"{call} vs {axis}"] = fit_exponent([r[axis] for r in sel], [r["median_s"] for r in sel])
    meta = _meta(device, dtype, quick, backend, rate)
    meta["gemm_rate_samples"] = rates
    return {"meta": meta, "rows": rows, "fits": fits}


def _meta(device, dtype, quick, backend, rate) -> dict:
    from guidance_kernels.bench.runner import device_name

    cfg = torch.__config__.show()
    blas = "MKL" if "Math Kernel Library" in cfg else ("OpenBLAS" if "openblas" in cfg.lower() else "unknown")
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    kernels = None
    if device.type == "cpu":
        from guidance_kernels.backends import cpu_gram

        kernels = cpu_gram.isa()  # the CPU extension's instruction set, None: MKL computes the products
    return {"part": "scaling", "device": device_name(device), "blas": blas, "cpu_kernel_isa": kernels,
            "dtype": str(dtype).replace("torch.", ""),
            "quick": quick, "backend": backend, "torch": torch.__version__, "gemm_fp32_flops_per_s": rate,
            "loadavg": load, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sweeps": SWEEPS[quick]}


def plot_scaling(result: dict):
    """One log-log panel per axis: measured time of each call (fitted exponent in the legend)
    and its full-GEMM floor (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    m = result["meta"]
    for ax, axis in zip(axes, ("n", "p", "L")):
        for call, color in (("loss fwd+bwd", "C0"), ("cka_matrix", "C1")):
            sel = [r for r in result["rows"] if r["axis"] == axis and r["call"] == call]
            xv = [r[axis] for r in sel]
            k = result["fits"][f"{call} vs {axis}"]
            ax.plot(xv, [r["median_s"] * 1e3 for r in sel], "o-", color=color, label=f"{call} (∝ {axis}^{k:.2f})")
            ax.plot(xv, [r["floor_s"] * 1e3 for r in sel], "--", color=color, alpha=0.6, label=f"{call} GEMM floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        base = ", ".join(f"{k}={v}" for k, v in m["sweeps"]["base"].items() if k != axis)
        ax.set_title(f"time vs {axis} ({base})")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    load = m.get("loadavg")
    isa = f" · kernels {m['cpu_kernel_isa']}" if m.get("cpu_kernel_isa") else ""
    fig.suptitle(f"{m['device']} · {m['blas']}{isa} · {m['dtype']} · floor {m['gemm_fp32_flops_per_s'] / 1e9:.0f} GFLOP/s"
                 + (f" · load {load[0]:.1f}" if load else ""), fontsize=9)
    fig.tight_layout()
    return fig


def write_scaling(result: dict, out: Path) -> list[Path]:
    """JSON at ``out`` and the figure beside it (same stem, ``.png``)."""
    from guidance_kernels.files import save_figure, write_json

    out = Path(out)
    paths = [write_json(out, result)]
    fig = plot_scaling(result)
    try:
        paths.append(save_figure(fig, out.with_suffix(".png"), dpi=110))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths
