"""The bench run: ceilings, then per workload and implementation: check, measure, record.

Order for every (workload, implementation, mode):

1. skip with a stated reason if the implementation is unavailable on the device, is not
   differentiable (fwd+bwd), or would take longer than ``max_call_s`` per call by its flop
   estimate and the measured matmul rate;
2. check it against the fp64 truth on the same inputs (loss, and in fwd+bwd the gradient):
   a wrong or failing one is recorded as ``wrong`` / ``error`` and NOT timed;
3. peak extra memory of one call, GPU kernel launches of one call;
4. time it (timing.measure) with rotating input sets;
5. derive GB/s, TFLOP/s, floor time, % of floor; speed-ups over eager and torch.compile.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
import traceback
from typing import Callable, Optional

import torch

from guidance_kernels.truth import loss_and_grad as fp64_loss_and_grad
from guidance_kernels.bench import baselines
from guidance_kernels.bench.ceilings import Ceilings, floor_seconds, measure_ceilings
from guidance_kernels.bench.timing import count_launches, measure, peak_extra_bytes, rotation_count
from guidance_kernels.bench.workloads import QUICK_SCALE, Workload, get_workloads

MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclasses.dataclass
class BenchConfig:
    workloads: Optional[list[str]] = None  # names or W1..W5; None = all
    device: str = "auto"
    dtype: str = "bf16"
    quick: bool = False
    scale: Optional[float] = None  # overrides the --quick scale
    impls: Optional[list[str]] = None  # implementation names to run; None = all
    modes: tuple = MODES
    warmup: Optional[int] = None
    min_reps: Optional[int] = None
    max_reps: Optional[int] = None
    budget_s: Optional[float] = None  # timing time per (workload, impl, mode)
    max_call_s: Optional[float] = None  # skip implementations estimated slower than this per call
    compile_scope: Optional[str] = None  # "pair" | "loss"
    e2e: bool = True
    seed: int = 0
    # Wall-clock limit for the whole run (None: none). Rows not started when it has passed are
    # recorded as skipped (and the e2e table too), so a run under an outer deadline (a lent GPU's
    # per-command limit) still writes its JSON / CSV / PNG with what it measured.
    time_limit_s: Optional[float] = None

    def resolved(self) -> "BenchConfig":
        c = dataclasses.replace(self)
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.scale is None:
            c.scale = QUICK_SCALE if c.quick else 1.0
        gpu = c.device.startswith("cuda")
        c.warmup = c.warmup if c.warmup is not None else (1 if c.quick and not gpu else 3)
        c.min_reps = c.min_reps if c.min_reps is not None else (3 if c.quick else 10)
        c.max_reps = c.max_reps if c.max_reps is not None else (10 if c.quick else 200)
        c.budget_s = c.budget_s if c.budget_s is not None else (0.1 if c.quick else 1.0)
        c.max_call_s = c.max_call_s if c.max_call_s is not None else (1.0 if c.quick else 30.0)
        c.compile_scope = c.compile_scope or ("pair" if c.quick or not gpu else "loss")
        return c


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(loss absolute tolerance per pair, gradient relative Frobenius tolerance)."""
    if dtype == torch.float64:
        return 1e-9, 1e-7
    if dtype == torch.float32:
        return 1e-4, 2e-3
    return 1e-4, 2e-2  # bf16 / fp16 gradients are rounded to the input dtype


def _rel_err(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((g.double() - r).square().sum()) for g, r in zip(grads, ref))
    den = sum(float(r.square().sum()) for r in ref)
    return (num / max(den, 1e-300)) ** 0.5


class _Truth:
    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys
        self._cache: dict = {}

    def get(self, metric: str, grad: bool):
        key = (metric, grad)
        if key not in self._cache:
            if not grad and (metric, True) in self._cache:
                return self._cache[(metric, True)][0], None
            self._cache[key] = fp64_loss_and_grad(self.xs, self.ys, metric, grad=grad)
        return self._cache[key]


def _check(impl, fn, mode, xs, ys, truth: _Truth, dtype, out=None) -> dict:
    """Compare one call's result with the fp64 truth. ``out``: the result of that call if it was
    already made (the loss in ``fwd``, ``(loss, grads)`` in ``fwd+bwd``)."""
    atol_pair, gtol = _tolerances(dtype)
    tol = atol_pair * len(xs)
    ref_loss, ref_grads = truth.get(impl.metric, grad=(mode == "fwd+bwd"))
    if out is None:
        out = _calls(fn, mode, impl.differentiable, with_loss=True)(xs, ys)
    if mode == "fwd":
        loss = float(out.detach())
        grad_err = None
    else:
        loss_t, grads = out
        loss = float(loss_t.detach())
        grad_err = _rel_err(grads, ref_grads)
    loss_err = abs(loss - ref_loss)
    ok = bool(loss_err <= tol and (grad_err is None or grad_err <= gtol))
    res = {"ok": ok, "loss": loss, "ref_loss": ref_loss, "loss_abs_err": loss_err, "loss_tol": tol}
    if grad_err is not None:
        res.update(grad_rel_err=grad_err, grad_tol=gtol)
    if not ok:
        why = []
        if not loss_err <= tol:
            why.append(f"loss {loss:.6g} vs fp64 {ref_loss:.6g} (|err| {loss_err:.2e} > {tol:.1e})")
        if grad_err is not None and not grad_err <= gtol:
            why.append(f"grad rel err {grad_err:.2e} > {gtol:.1e}")
        res["why"] = "; ".join(why)
    return res


def _calls(fn, mode, differentiable=True, with_loss=False):
    """The timed call: the loss (``fwd``) or the gradients w.r.t. the targets (``fwd+bwd``;
    ``(loss, grads)`` with ``with_loss``)."""
    if mode == "fwd+bwd":

        def fwd_bwd(xs, ys):
            loss = fn(xs, ys)
            if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
                raise RuntimeError("loss does not require grad")
            grads = torch.autograd.grad(loss, xs)
            return (loss, grads) if with_loss else grads

        return fwd_bwd
    if not differentiable:  # analysis tools: forward under no_grad

        def call(xs, ys):
            with torch.no_grad():
                return fn(xs, ys)

        return call
    return lambda xs, ys: fn(xs, ys)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except Exception:  # noqa: BLE001
        pass
    return f"{cpu} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def _timed(cost: dict, floor_s: float, med: float, p20: float, p80: float, reps: int, rotation_sets: int) -> dict:
    """The fields of a timed ("ok") record from its median and quantiles (seconds)."""
    return dict(
        status="ok",
        median_s=med,
        p20_s=p20,
        p80_s=p80,
        reps=reps,
        gbps=cost["bytes"] / med / 1e9,
        tflops=cost["flops"] / med / 1e12,
        pct_floor=100.0 * floor_s / med,
        rotation_sets=rotation_sets,
    )


def _out_of_time(cfg: BenchConfig, t_start: Optional[float]) -> Optional[str]:
    """The skip reason once ``cfg.time_limit_s`` has passed since ``t_start``, else None."""
    if cfg.time_limit_s is None or t_start is None:
        return None
    if time.perf_counter() - t_start < cfg.time_limit_s:
        return None
    return f"bench time limit ({cfg.time_limit_s:g} s) reached before this row"


def run_workload(
    w: Workload,
    impls,
    cfg: BenchConfig,
    ceil: Ceilings,
    device: torch.device,
    dtype,
    log: Callable,
    t_start: Optional[float] = None,
) -> list[dict]:
    late = _out_of_time(cfg, t_start)
    if late is not None:  # not even the inputs: record every row as skipped
        records = []
        for impl in impls:
            for mode in cfg.modes:
                cost = w.cost(dtype, backward=(mode == "fwd+bwd"))
                floor_s, bound = floor_seconds(cost, ceil)
                records.append({
                    "workload": w.name, "shapes": w.summary(), "impl": impl.name, "kind": impl.kind,
                    "metric": impl.metric, "note": impl.note, "mode": mode, "bytes": cost["bytes"],
                    "flops": cost["flops"], "floor_s": floor_s, "bound": bound,
                    "status": "skipped", "reason": late,
                })
        log(f"  {w.name:16s} skipped: {late}")
        return records
    xs, ys = w.make_inputs(device, dtype, seed=cfg.seed)
    k = rotation_count(w.input_bytes(dtype), device)
    arg_sets = [(xs, ys)] + [w.make_inputs(device, dtype, seed=cfg.seed + 1 + i) for i in range(k - 1)]
    truth = _Truth(xs, ys)
    opts = {"compile_scope": cfg.compile_scope}
    records = []
    for impl in impls:
        base = {
            "workload": w.name,
            "shapes": w.summary(),
            "impl": impl.name,
            "kind": impl.kind,
            "metric": impl.metric,
            "note": impl.note,
        }
        reason = impl.why_unavailable(device)
        if reason is None and impl.est_flops is not None:
            est = baselines.est_seconds(impl, w, ceil.matmul_flops_per_s, ceil.matmul_rates)
            if est > cfg.max_call_s:
                reason = f"estimated {est:.3g} s per call > max_call_s={cfg.max_call_s:g} (n^3 / n^2 cost)"
        fn = None
        if reason is None:
            try:
                fn = impl.make(w, opts)
            except Exception as e:  # noqa: BLE001
                reason = f"could not build: {type(e).__name__}: {e}"
        for mode in cfg.modes:
            rec = dict(base, mode=mode)
            cost = w.cost(dtype, backward=(mode == "fwd+bwd"))
            floor_s, bound = floor_seconds(cost, ceil)
            rec.update(bytes=cost["bytes"], flops=cost["flops"], floor_s=floor_s, bound=bound)
            if reason is not None:
                rec.update(status="skipped", reason=reason)
                records.append(rec)
                continue
            late = _out_of_time(cfg, t_start)
            if late is not None:
                rec.update(status="skipped", reason=late)
                records.append(rec)
                continue
            if mode == "fwd+bwd" and not impl.differentiable:
                rec.update(status="n/a", reason="not differentiable: forward / analysis only")
                records.append(rec)
                continue
            t0 = time.perf_counter()
            try:
                truth.get(impl.metric, grad=(mode == "fwd+bwd"))  # before the memory measurement
                # The checked call is also the memory-measured one.
                t_call = time.perf_counter()
                peak, out = peak_extra_bytes(_calls(fn, mode, impl.differentiable, True), (xs, ys), device)
                t_call = time.perf_counter() - t_call
                rec["peak_extra_bytes"] = peak
                chk = _check(impl, fn, mode, xs, ys, truth, dtype, out=out)
                del out
            except Exception as e:  # noqa: BLE001
                rec.update(status="error", reason=f"{type(e).__name__}: {e}".strip()[:300])
                rec["traceback"] = traceback.format_exc(limit=4)
                log(f"  {w.name:16s} {impl.name:14s} {mode:8s} ERROR {rec['reason']}")
                records.append(rec)
                continue
            rec["check"] = chk
            if not chk["ok"]:
                rec.update(status="wrong", reason=chk.get("why", "mismatch"))
                log(f"  {w.name:16s} {impl.name:14s} {mode:8s} WRONG {rec['reason']}")
                records.append(rec)
                continue
            call = _calls(fn, mode, impl.differentiable)
            if t_call > cfg.max_call_s:  # slow, or a first call that compiled: time a warm one
                t_call = time.perf_counter()
                call(xs, ys)
                t_call = time.perf_counter() - t_call
            if t_call > cfg.max_call_s:  # the flop estimate missed it: one warm call is the timing
                rec.update(
                    _timed(cost, floor_s, t_call, t_call, t_call, reps=1, rotation_sets=1),
                    reason=f"timed once: a warm call took {t_call:.3g} s > max_call_s={cfg.max_call_s:g}",
                )
                log(f"  {w.name:16s} {impl.name:14s} {mode:8s} {t_call * 1e3:9.3f} ms  (one call, > max_call_s)")
                records.append(rec)
                continue
            try:
                rec["launches"] = count_launches(call, (xs, ys), device)
                tm = measure(
                    call,
                    arg_sets,
                    device,
                    warmup=cfg.warmup,
                    min_reps=cfg.min_reps,
                    max_reps=cfg.max_reps,
                    budget_s=cfg.budget_s,
                )
            except Exception as e:  # noqa: BLE001
                rec.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
                records.append(rec)
                continue
            med = tm.median_s
            rec.update(_timed(cost, floor_s, med, tm.p20_s, tm.p80_s, reps=tm.reps, rotation_sets=k))
            log(
                f"  {w.name:16s} {impl.name:14s} {mode:8s} {med * 1e3:9.3f} ms  "
                f"{rec['pct_floor']:6.2f}% floor  (check+time {time.perf_counter() - t0:.1f}s)"
            )
            records.append(rec)
    # speed-ups within this run
    for mode in cfg.modes:
        ref = {r["impl"]: r["median_s"] for r in records if r["mode"] == mode and r["status"] == "ok"}
        for r in records:
            if r["mode"] != mode or r["status"] != "ok":
                continue
            r["speedup_vs_eager"] = ref["eager"] / r["median_s"] if "eager" in ref else None
            r["speedup_vs_compile"] = ref["torch.compile"] / r["median_s"] if "torch.compile" in ref else None
    return records


def _loadavg() -> Optional[list]:
    """1/5/15-minute load averages: a CPU run on a busy machine says so in its JSON."""
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_bench(cfg: BenchConfig, log: Callable = print) -> dict:
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    t_start = time.perf_counter()
    load_start = _loadavg()
    torch.manual_seed(cfg.seed)
    workloads = get_workloads(cfg.workloads, cfg.scale)
    impls = baselines.implementations()
    if cfg.impls:
        impls = [i for i in impls if i.name in cfg.impls]
    log(f"device {device_name(device)}; dtype {cfg.dtype}; scale {cfg.scale:g}")
    ceil = measure_ceilings(device, dtype, quick=cfg.quick)
    log(
        f"ceilings: copy {ceil.copy_bytes_per_s / 1e9:.1f} GB/s, matmul {ceil.matmul_flops_per_s / 1e12:.3f} "
        f"TFLOP/s ({ceil.matmul_dtype})"
    )
    records = []
    for w in workloads:
        log(f"{w.name}: {w.summary()}")
        records += run_workload(w, impls, cfg, ceil, device, dtype, log, t_start=t_start)
    e2e = []
    late = _out_of_time(cfg, t_start) if cfg.e2e else None
    if late is not None:
        log(f"e2e skipped: {late}")
        e2e = [{"variant": "e2e", "status": "skipped", "reason": late}]
    elif cfg.e2e:
        from guidance_kernels.bench.e2e import run_e2e

        try:
            e2e = run_e2e(device, dtype, cfg, log=log)
        except Exception as e:  # noqa: BLE001
            e2e = [{"variant": "e2e", "status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}]
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["modes"] = list(cfg.modes)
    return {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": str(device),
            "device_name": device_name(device),
            "dtype": cfg.dtype,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "quick": cfg.quick,
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "scale": cfg.scale,
            "config": cfg_dict,
            "implementations": [
                {"name": i.name, "kind": i.kind, "metric": i.metric, "package": i.package, "note": i.note}
                for i in impls
            ],
            "workloads": {w.name: {"summary": w.summary(), "description": w.description} for w in workloads},
            "wall_s": time.perf_counter() - t_start,
        },
        "ceilings": ceil.as_dict(),
        "records": records,
        "e2e": e2e,
    }
