"""What a user sees: a rich table per experiment, verdict lines, results.json and summary.md.

JSON goes through :func:`guidance_kernels.files.write_json` (strict: NaN -> null). Accuracies
are fractions in the data and percentages in the tables.
"""

from __future__ import annotations

import math
import os
import platform
import time

from guidance_kernels.train.experiments.spec import ExperimentSpec, judge
from guidance_kernels.train.experiments.verdict import mean_sd


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}"


def _ms(v: list[float]) -> str:
    m, s = mean_sd(v)
    return _pct(m) if not math.isfinite(s) else f"{_pct(m)} ± {100 * s:.1f}"


def summarise(spec: ExperimentSpec, res: dict) -> dict:
    """Per-arm accuracies, guide accuracies and verdicts of one experiment's runs."""
    acc = {a: [r["final_acc"] for r in res["runs"] if r["arm"] == a] for a in spec.arms}
    return {
        "experiment": spec.name, "title": spec.title, "spec": spec.to_dict(),
        "seeds": sorted({g["seed"] for g in res["guides"]}),
        "guide_acc": [g["acc"] for g in res["guides"]],
        "guide_steps": [g.get("steps") for g in res["guides"]],
        "guide_val_acc": [g.get("val_acc") for g in res["guides"]],
        "final_acc": acc,
        "mean_sd": {a: dict(zip(("mean", "sd"), mean_sd(v))) for a, v in acc.items()},
        "verdicts": judge(spec, acc),
        "runs": res["runs"], "guides": res["guides"],
    }


def rows(s: dict) -> list[tuple[str, str, str]]:
    """(arm, mean ± sd %, per-seed %) rows, the trained guide first."""
    steps = [x for x in s.get("guide_steps", []) if x is not None]
    label = "trained guide itself"
    if steps:
        label += f" ({'/'.join(str(x) for x in steps)} steps)" if len(set(steps)) > 1 else f" ({steps[0]} steps)"
    out = [(label, _ms(s["guide_acc"]), " ".join(_pct(x) for x in s["guide_acc"]))]
    val = s.get("guide_val_acc", [])
    if val and all(x is not None for x in val):
        out.append(("trained guide, validation carve", _ms(val), " ".join(_pct(x) for x in val)))
    for a, v in s["final_acc"].items():
        out.append((a, _ms(v), " ".join(_pct(x) for x in v)))
    return out


def print_tables(summaries: list[dict], console) -> None:
    from rich.table import Table

    for s in summaries:
        sp = s["spec"]
        t = Table(title=f"{s['title']} — final test accuracy %, {len(s['seeds'])} seed(s), "
                        f"{sp['steps']} task steps (chance {100 * sp['chance']:.1f} %)")
        t.add_column("arm")
        t.add_column("mean ± sd", justify="right")
        t.add_column("per seed", justify="left")
        for r in rows(s):
            t.add_row(*r)
        console.print(t)
        for v in s["verdicts"]:
            console.print(v["text"], markup=False, highlight=False)


def markdown(summaries: list[dict], seconds: float) -> str:
    """summary.md: a table per experiment (per-seed numbers) and its verdict lines."""
    lines = [f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {_machine()}, "
             f"{seconds:.0f} s in all.", ""]
    for s in summaries:
        sp = s["spec"]
        lines += [f"### {s['title']}", "",
                  f"Final test accuracy (%), {len(s['seeds'])} seed(s), {sp['steps']} task steps, "
                  f"chance {100 * sp['chance']:.1f} %.", "",
                  "| arm | mean ± sd | per seed |", "|---|---:|---|"]
        lines += [f"| {a} | {m} | {p} |" for a, m, p in rows(s)]
        lines += [""] + [f"- {v['text']}" for v in s["verdicts"]] + [""]
    return "\n".join(lines)


def _machine() -> str:
    import torch

    return f"{platform.machine()} {os.cpu_count()} CPU(s), torch {torch.__version__}"


def write_outputs(summaries: list[dict], out_dir: str, seconds: float, options: dict) -> list[str]:
    """results.json, summary.md and one PNG per experiment in ``out_dir``; returns the paths."""
    from guidance_kernels.files import write_json, write_text
    from guidance_kernels.train.experiments.plot import plot_experiment

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "summary.md")]
    write_json(paths[0], {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "machine": _machine(), "seconds": seconds, "options": options,
                          "experiments": {s["experiment"]: s for s in summaries}})
    write_text(paths[1], markdown(summaries, seconds))
    for s in summaries:
        p = os.path.join(out_dir, f"{s['experiment']}.png")
        plot_experiment(s, p)
        paths.append(p)
    return paths
