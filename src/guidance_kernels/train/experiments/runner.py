"""Seeds x arms of one or more experiments, in worker processes (one thread each).

Per experiment and seed the guide is trained once; as soon as it is done, that seed's arms are
queued. A plain line is printed per finished run (works in logs and CI): the run, its accuracy,
its own seconds, the elapsed time and an ETA. The ETA uses the finished runs' own durations
(seconds per step-unit of :func:`_cost`, per experiment, divided over the workers), so process
start-up and imports do not inflate it.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Optional

from guidance_kernels.train.experiments.spec import ExperimentSpec


def _job(kind: str, spec: ExperimentSpec, arm: Optional[str], seed: int, state) -> dict:
    import torch

    torch.set_num_threads(1)  # small matrices: one thread per process beats contended threads
    from guidance_kernels.train.experiments.arms import run_arm, train_guide

    if kind == "guide":
        return {"kind": "guide", "exp": spec.name, "seed": seed, **train_guide(spec, seed)}
    return {"kind": "arm", "exp": spec.name, **run_arm(spec, arm, seed, state)}


def _cost(spec: ExperimentSpec, arm: Optional[str]) -> float:
    """Relative cost of a run, in task-step units (for the ETA only)."""
    if arm is None:
        return float(min(spec.guide_checks or (spec.guide_steps,)))
    if arm == "alone":
        return float(spec.steps)
    extra = spec.warmup_steps if arm.startswith("warmup") else 0
    return 1.6 * (spec.steps + extra) if not arm.startswith(("kd", "firstk")) else 1.3 * spec.steps


def eta_seconds(seconds_done: float, cost_done: float, cost_total: float, workers: int) -> float:
    """Seconds left: the remaining cost at the finished runs' own seconds per cost unit, spread
    over ``workers`` (0 when nothing is left)."""
    return eta_parts([(seconds_done, cost_done, cost_total)], workers)


def eta_parts(parts: list[tuple[float, float, float]], workers: int) -> float:
    """ETA over experiments ``(seconds_done, cost_done, cost_total)`` each at its own seconds per
    cost unit (steps of different experiments cost differently); an experiment with no finished
    run yet uses the pooled rate."""
    sec, cost = sum(p[0] for p in parts), sum(p[1] for p in parts)
    pooled = sec / cost if cost > 0 else 0.0
    left = sum(max(t - c, 0.0) * (s / c if c > 0 else pooled) for s, c, t in parts)
    return left / max(workers, 1)


def run_all(specs: list[ExperimentSpec], seeds: int, workers: int = 2,
            log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every spec: ``{name: {"guides": [...], "runs": [...], "seconds"}}``."""
    t0 = time.perf_counter()
    n_runs = sum(seeds * (1 + len(s.arms)) for s in specs)
    done = {"runs": 0}
    # per experiment: [seconds of finished runs, their cost, total cost]
    part = {s.name: [0.0, 0.0, seeds * (_cost(s, None) + sum(_cost(s, a) for a in s.arms))] for s in specs}
    out = {s.name: {"guides": [], "runs": []} for s in specs}
    by_name = {s.name: s for s in specs}

    def report(r: dict) -> None:
        spec = by_name[r["exp"]]
        arm = r.get("arm")
        cost = _cost(spec, arm) if r["kind"] == "arm" else float(r.get("steps") or spec.guide_steps)
        done["runs"] += 1
        p = part[spec.name]
        p[0] += r["seconds"]
        p[1] += cost
        p[2] += cost - _cost(spec, arm)     # a guide's actual steps replace the estimate
        el = time.perf_counter() - t0
        eta = eta_parts([tuple(v) for v in part.values()], workers)
        what = f"guide  seed {r['seed']}" if r["kind"] == "guide" else f"{arm:<16} seed {r['seed']}"
        log(f"[{done['runs']:>3}/{n_runs}] {spec.name:<10} {what}  acc {r['acc' if r['kind'] == 'guide' else 'final_acc']:.3f}"
            f"  ({r['seconds']:.0f} s)  elapsed {el:.0f} s, ETA {eta:.0f} s")
        sys.stdout.flush()
        if r["kind"] == "guide":
            out[r["exp"]]["guides"].append(r)
        else:
            out[r["exp"]]["runs"].append(r)

    def arm_jobs(spec, seed, state):
        arms = sorted(spec.arms, key=lambda a: -_cost(spec, a))   # longest first: a shorter tail
        return [("arm", spec, a, seed, state if a.endswith("_trained") else None) for a in arms]

    guide_jobs = [("guide", s, None, k, None) for k in range(seeds) for s in specs]
    if workers <= 1:
        for j in guide_jobs:
            g = _job(*j)
            report(g)
            for aj in arm_jobs(by_name[g["exp"]], g["seed"], g["state"]):
                report(_job(*aj))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            pending = {ex.submit(_job, *j) for j in guide_jobs}
            while pending:
                fin, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in fin:
                    r = f.result()
                    report(r)
                    if r["kind"] == "guide":
                        pending |= {ex.submit(_job, *aj)
                                    for aj in arm_jobs(by_name[r["exp"]], r["seed"], r["state"])}
    el = time.perf_counter() - t0
    for name, o in out.items():
        o["guides"].sort(key=lambda g: g["seed"])
        arms = by_name[name].arms
        o["runs"].sort(key=lambda r: (arms.index(r["arm"]), r["seed"]))
        for g in o["guides"]:
            g.pop("state", None)
        o["seconds"] = el
    return out
