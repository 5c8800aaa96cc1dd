"""``guidance-kernels bench``: time the canonical workloads for every available implementation."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from guidance_kernels.commands.options import device_option


class DType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"
    fp64 = "fp64"


class Mode(str, Enum):
    fwd = "fwd"
    fwd_bwd = "fwd+bwd"


class Scope(str, Enum):
    pair = "pair"
    loss = "loss"


class Part(str, Enum):
    workloads = "workloads"
    scaling = "scaling"


def command(
    workloads: Optional[List[str]] = typer.Option(
        None, "--workload", "-w", help="Workload name or W1..W5; repeat for several (default: all)."
    ),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto.", callback=device_option),
    dtype: DType = typer.Option(DType.bf16, help="Activation dtype."),
    quick: bool = typer.Option(False, "--quick", help="Scaled-down shapes and short timing (about a minute on a 2-core CPU)."),
    scale: Optional[float] = typer.Option(None, min=1e-6, help="Shape scale (overrides --quick's 0.125)."),
    impl: Optional[List[str]] = typer.Option(None, "--impl", "-i", help="Only these implementations (repeatable)."),
    mode: Optional[List[Mode]] = typer.Option(None, "--mode", "-m", help="fwd and/or fwd+bwd (default both)."),
    budget: Optional[float] = typer.Option(None, min=0.0, help="Seconds of timing per (workload, implementation, mode)."),
    max_call_s: Optional[float] = typer.Option(None, min=0.0, help="Skip implementations estimated slower than this per call."),
    compile_scope: Optional[Scope] = typer.Option(None, help="torch.compile scope: pair (per-pair function) or loss."),
    e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Also time one guided training step."),
    time_limit: Optional[float] = typer.Option(
        None, "--time-limit", min=0.0, help="Seconds for the whole run; rows not started by then are recorded as skipped."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON path; the CSV and PNG go beside it."),
    markdown: bool = typer.Option(False, "--markdown", help="Also print the table as Markdown."),
    part: Part = typer.Option(Part.workloads, "--part", help="workloads (W1-W5) or scaling (cost curves in n, p, L)."),
) -> None:
    """Bench W1-W5 against eager, torch.compile, the paper's formulation and peers (% of floor)."""
    if part == Part.scaling:
        return _scaling(device, dtype.value, quick, budget, out)
    from guidance_kernels.bench import baselines, report
    from guidance_kernels.bench.runner import MODES, BenchConfig, run_bench
    from guidance_kernels.bench.workloads import get_workloads

    modes = tuple(m.value for m in mode) if mode else MODES
    if workloads:
        try:
            get_workloads(list(workloads))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="'--workload' / '-w'") from e
    if impl:
        known = [i.name for i in baselines.implementations()]
        bad = [i for i in impl if i not in known]
        if bad:
            raise typer.BadParameter(f"unknown implementation(s) {bad}; choose from {known}",
                                     param_hint="'--impl' / '-i'")
    cfg = BenchConfig(
        workloads=list(workloads) if workloads else None,
        device=device,
        dtype=dtype.value,
        quick=quick,
        scale=scale,
        impls=list(impl) if impl else None,
        modes=modes,
        budget_s=budget,
        max_call_s=max_call_s,
        compile_scope=compile_scope.value if compile_scope else None,
        e2e=e2e,
        time_limit_s=time_limit,
    )
    result = run_bench(cfg, log=lambda s: typer.echo(s, err=True))
    report.print_table(result)
    if markdown:
        typer.echo(report.markdown_table(result))
    if out is not None:
        for p in report.write_all(result, out):
            typer.echo(f"wrote {p}", err=True)


def _scaling(device: str, dtype: str, quick: bool, budget: Optional[float], out: Optional[Path]) -> None:
    import torch

    from guidance_kernels.bench.runner import DTYPES
    from guidance_kernels.bench.scaling import run_scaling, write_scaling

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    result = run_scaling(dev, DTYPES[dtype], quick, budget_s=budget, log=lambda s: typer.echo(s, err=True))
    for name, k in result["fits"].items():
        typer.echo(f"{name}: exponent {k:.2f}")
    if out is not None:
        for p in write_scaling(result, out):
            typer.echo(f"wrote {p}", err=True)
