"""``run_demo``: build the specs from the options, run them, print and write the results."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional


def make_specs(names: list[str], steps: Optional[int] = None, quick: bool = False):
    """Specs for ``names``; ``--quick`` halves every step count, ``steps`` sets the task steps
    (and caps the guide's training, the warm-up and first-K at that number)."""
    from guidance_kernels.train.experiments.arms import task

    specs = []
    for n in names:
        s = task(n).spec()
        if quick:
            s = dataclasses.replace(s, steps=max(1, s.steps // 2), guide_steps=max(1, s.guide_steps // 2),
                                    warmup_steps=max(1, s.warmup_steps // 2), first_k=max(1, s.first_k // 2))
        if steps is not None:
            s = dataclasses.replace(s, steps=steps, guide_steps=min(s.guide_steps, max(steps, 1)),
                                    warmup_steps=min(s.warmup_steps, steps), first_k=min(s.first_k, steps),
                                    eval_every=min(s.eval_every, steps))
        specs.append(s)
    return specs


def run_demo(names: list[str], *, seeds: Optional[int] = None, steps: Optional[int] = None,
             quick: bool = False, out: str = "runs/demo", workers: int = 2, console=None) -> list[dict]:
    from rich.console import Console

    from guidance_kernels.train.experiments.report import print_tables, summarise, write_outputs
    from guidance_kernels.train.experiments.runner import run_all

    console = console or Console()
    n_seeds = seeds if seeds is not None else (1 if quick else 5)
    specs = make_specs(names, steps, quick)
    t0 = time.perf_counter()
    print(f"demo: {', '.join(names)}; {n_seeds} seed(s); {workers} worker(s); "
          + "; ".join(f"{s.name}: {len(s.arms)} arms x {s.steps} steps" for s in specs), flush=True)
    res = run_all(specs, n_seeds, workers=workers)
    seconds = time.perf_counter() - t0
    summaries = [summarise(s, res[s.name]) for s in specs]
    print_tables(summaries, console)
    paths = write_outputs(summaries, out, seconds,
                          {"experiments": names, "seeds": n_seeds, "steps": steps, "quick": quick,
                           "workers": workers})
    console.print(f"wrote {', '.join(paths)} ({seconds:.0f} s)", markup=False, highlight=False)
    return summaries
