"""Typer command ``guidance-kernels demo``."""

from __future__ import annotations

from typing import Optional

import typer


def command(
    out: str = typer.Option("runs/demo", "--out", help="output folder for results.json and curves.png"),
    quick: bool = typer.Option(False, "--quick", help="one seed (about a minute)"),
    seeds: Optional[int] = typer.Option(None, help="number of seeds (default 5, 1 with --quick)"),
    steps: Optional[int] = typer.Option(None, help="task steps per arm (default 300)"),
    workers: int = typer.Option(2, help="parallel processes, one thread each"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
) -> None:
    """The main job: test the paper's three claims on scikit-learn's digits, on the CPU.

    (a) a 40-layer plain FCN stays near chance alone but trains with guidance from a small CNN;
    (b) guidance from an untrained CNN helps where KD from the same untrained teacher does not;
    (c) a short noise warm-up recovers most of the gain of continuous guidance.
    Prints a table (mean ± std over seeds) and a verdict per claim; writes results.json and
    curves.png to --out."""
    from guidance_kernels.train.demo import DemoConfig, run_demo

    cfg = DemoConfig(workers=workers)
    if quick:
        cfg.seeds = 1
    if seeds is not None:
        cfg.seeds = seeds
    if steps is not None:
        cfg.steps = steps
    run_demo(cfg, out, progress=not no_progress)
