"""Report a bench result: rich table, JSON, CSV (one row per record), PNG bars, Markdown table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from guidance_kernels import files

CSV_FIELDS = [
    "date", "device", "device_name", "dtype", "scale", "workload", "shapes", "impl", "kind", "metric",
    "mode", "status", "reason", "median_s", "p20_s", "p80_s", "reps", "bytes", "flops", "gbps", "tflops",
    "floor_s", "bound", "pct_floor", "peak_extra_bytes", "launches", "speedup_vs_eager",
    "speedup_vs_compile",
]  # fmt: skip


def _ms(v: Optional[float]) -> str:
    return "" if v is None else f"{v * 1e3:.4g}"


def _f(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mib(v) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def _status(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    return f"{r['status']}: {r.get('reason', '')}"


def _short_status(r: dict, notes: dict) -> str:
    """``ok``, or the status with a footnote number for its reason (reasons listed once)."""
    if r["status"] == "ok":
        return "ok"
    reason = r.get("reason", "")
    if reason not in notes:
        notes[reason] = len(notes) + 1
    return f"{r['status']} [{notes[reason]}]"


def table_rows(result: dict, notes: Optional[dict] = None) -> list[list[str]]:
    """One row per record; with ``notes`` (a dict to fill), statuses carry footnote numbers."""
    rows = []
    for r in result["records"]:
        ok = r["status"] == "ok"
        rows.append(
            [
                r["workload"],
                r["impl"],
                r["mode"],
                _ms(r.get("median_s")) if ok else "",
                f"{_ms(r.get('p20_s'))}–{_ms(r.get('p80_s'))}" if ok else "",
                _f(r.get("gbps"), ".3g"),
                _f(r.get("tflops"), ".3g"),
                _ms(r.get("floor_s")),
                _f(r.get("pct_floor"), ".1f"),
                _mib(r.get("peak_extra_bytes")),
                _f(r.get("launches"), "d"),
                _f(r.get("speedup_vs_eager"), ".2f"),
                _f(r.get("speedup_vs_compile"), ".2f"),
                _status(r) if notes is None else _short_status(r, notes),
            ]
        )
    return rows


HEADERS = [
    "workload", "impl", "mode", "median ms", "p20–p80 ms", "GB/s", "TFLOP/s", "floor ms", "% floor",
    "extra MiB", "launches", "× eager", "× compile", "status",
]  # fmt: skip


def _title(result: dict) -> str:
    m = result["meta"]
    c = result["ceilings"]
    return (
        f"{m['device_name']} · {m['dtype']} · scale {m['scale']:g} · {m['date'][:10]} · ceilings: copy "
        f"{c['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {c['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s "
        f"({c['matmul_dtype']})"
        + (f" · load avg {m['loadavg_start'][0]:.1f} at start" if m.get("loadavg_start") and m["device"] == "cpu" else "")
    )


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        console = Console(width=max(console.width, 200))  # 14 columns: never squeeze them into 80
    t = Table(title=_title(result), show_lines=False, header_style="bold")
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("workload", "impl", "mode", "status") else "right",
                     no_wrap=True)  # fmt: skip
    prev = None
    notes: dict = {}
    for row in table_rows(result, notes):
        if prev is not None and row[0] != prev:
            t.add_section()
        prev = row[0]
        style = None if row[-1] == "ok" else ("red" if row[-1].startswith(("wrong", "error")) else "dim")
        t.add_row(*row, style=style)
    console.print(t)
    for reason, i in notes.items():
        console.print(f"  [{i}] {reason}", highlight=False, soft_wrap=True)
    if result.get("e2e"):
        e = Table(title="end-to-end: one training step", header_style="bold", width=console.width)
        for h in ("variant", "median ms", "p20–p80 ms", "overhead vs none", "status", "setting"):
            e.add_column(h)
        for r in result["e2e"]:
            ok = r.get("status") == "ok"
            e.add_row(
                r["variant"],
                _ms(r.get("median_s")) if ok else "",
                f"{_ms(r.get('p20_s'))}–{_ms(r.get('p80_s'))}" if ok else "",
                _f(r.get("overhead_pct"), "+.1f") + ("%" if r.get("overhead_pct") is not None else ""),
                _status(r),
                r.get("shape", ""),
            )
        console.print(e)


def markdown_table(result: dict) -> str:
    """The table as Markdown (for bench/README.md)."""
    lines = [f"*{_title(result)}*", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    notes: dict = {}
    for row in table_rows(result, notes):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    lines += [""] + [f"[{i}] {reason}  " for reason, i in notes.items()]
    if result.get("e2e"):
        lines += ["", "| e2e variant | median ms | overhead vs none | status |", "|---|---|---|---|"]
        for r in result["e2e"]:
            oh = r.get("overhead_pct")
            lines.append(
                f"| {r['variant']} | {_ms(r.get('median_s'))} | {'' if oh is None else f'{oh:+.1f}%'} | "
                f"{_status(r)} |"
            )
        lines.append(f"\n*e2e: {result['e2e'][0].get('shape', '')}*")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    files.write_json(path, result, indent=1)


def write_csv(result: dict, path: Path) -> None:
    m = result["meta"]
    with files.atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["records"]:
            w.writerow({**{k: m.get(k) for k in ("date", "device", "device_name", "dtype", "scale")}, **r})
        for r in result.get("e2e", []):
            w.writerow(
                {
                    **{k: m.get(k) for k in ("date", "device", "device_name", "dtype", "scale")},
                    "workload": "e2e_train_step",
                    "shapes": r.get("shape"),
                    "impl": r["variant"],
                    "kind": "e2e",
                    "mode": "train-step",
                    "status": r.get("status"),
                    "reason": r.get("reason"),
                    "median_s": r.get("median_s"),
                    "p20_s": r.get("p20_s"),
                    "p80_s": r.get("p80_s"),
                    "reps": r.get("reps"),
                }
            )


def write_png(result: dict, path: Path) -> None:
    """Two rows (fwd, fwd+bwd) x two panels (% of floor, speed-up over eager), bars per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if r["status"] == "ok"]
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in recs)] or ["fwd"]
    workloads = list(dict.fromkeys(r["workload"] for r in result["records"]))
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i % 10) for i, name in enumerate(impls)}
    fig, axes = plt.subplots(len(modes), 2, figsize=(15, 4.2 * len(modes)), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for row, mode in enumerate(modes):
        for col, (key, label, log) in enumerate(
            (("pct_floor", "% of floor (higher is better)", True), ("speedup_vs_eager", "speed-up over eager (×)", True))
        ):
            ax = axes[row][col]
            for j, name in enumerate(impls):
                xs, hs = [], []
                for i, wname in enumerate(workloads):
                    r = next((r for r in recs if r["workload"] == wname and r["impl"] == name and r["mode"] == mode), None)
                    if r is not None and r.get(key):
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        hs.append(r[key])
                ax.bar(xs, hs, width, label=name, color=colors[name])
            ax.set_xticks(range(len(workloads)))
            ax.set_xticklabels(workloads, rotation=15, fontsize=9)
            if log:
                ax.set_yscale("log")
            if key == "speedup_vs_eager":
                ax.axhline(1.0, color="black", lw=0.8, ls="--")
            else:
                ax.axhline(100.0, color="black", lw=0.8, ls="--")
            ax.set_title(f"{mode}: {label}", fontsize=10)
            ax.grid(axis="y", which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if labels:  # no timed row at all (e.g. everything skipped): no legend
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    try:
        files.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def write_all(result: dict, out: Path) -> list[Path]:
    """Write ``out`` (JSON) and the CSV and PNG beside it (same stem)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out, out.with_suffix(".csv"), out.with_suffix(".png")]
    write_json(result, paths[0])
    write_csv(result, paths[1])
    write_png(result, paths[2])
    return paths
