"""Write the measured fastest GPU backend per shape class into the dispatch table that
``backend="auto"`` reads (:mod:`guidance_kernels.backends.dispatch`).

    python -m guidance_kernels.bench.dispatch bench/results/DATE_h100.json [--table PATH]

For every workload of the run, the ``fwd+bwd`` rows of our GPU backends (``gk:triton``,
``gk:cuda``) that passed their check are compared; a shape class shared by several workloads
(W1 and W2) goes to the backend with the smaller summed time. The entry is keyed by the run's
device name (``torch.cuda.get_device_name``) and records its source file, date and dtype.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Optional

from guidance_kernels import files
from guidance_kernels.backends.dispatch import TABLE, load_table
from guidance_kernels.planning import shape_class_of
from guidance_kernels.bench.workloads import get_workloads

CANDIDATES = {"gk:triton": "triton", "gk:cuda": "cuda"}


def winners(result: dict) -> dict[str, str]:
    """``{shape class: backend}`` from a bench result (the JSON written by ``--out``)."""
    scale = result["meta"].get("scale", 1.0)
    by_name = {w.name: w for w in get_workloads(None, scale=scale)}
    totals: dict = {}  # class -> backend -> summed seconds
    seen: dict = {}  # class -> workloads with a time for every candidate that ran
    for r in result["records"]:
        backend = CANDIDATES.get(r["impl"])
        w = by_name.get(r["workload"])
        if backend is None or w is None or r["mode"] != "fwd+bwd" or r.get("status") != "ok":
            continue
        klass = shape_class_of(w.n, w.forms(), result["meta"].get("dtype", "bf16"))
        totals.setdefault(klass, {}).setdefault(backend, 0.0)
        totals[klass][backend] += r["median_s"]
        seen.setdefault(klass, {}).setdefault(backend, set()).add(w.name)
    out = {}
    for klass, t in totals.items():
        # compare only backends measured on every workload of the class that any was measured on
        full = [b for b in t if seen[klass][b] == set().union(*seen[klass].values())]
        if full:  # else the sums are over different workloads: leave the class to the priorities
            out[klass] = min(full, key=t.get)
    return out


def update_table(result_path: str, table_path: Optional[str] = None) -> dict:
    result = json.loads(pathlib.Path(result_path).read_text())
    meta = result["meta"]
    if meta.get("device") in (None, "cpu") or not str(meta.get("device")).startswith("cuda"):
        raise SystemExit(f"{result_path}: not a GPU run (device {meta.get('device')!r}); nothing to write")
    if meta.get("quick") or meta.get("scale", 1.0) != 1.0:
        raise SystemExit(f"{result_path}: a scaled-down run (scale {meta.get('scale')}); use a full-size run")
    classes = winners(result)
    path = pathlib.Path(table_path or TABLE)
    table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    table.setdefault("devices", {})[meta["device_name"]] = {
        "classes": classes,
        "source": str(result_path),
        "date": meta.get("date"),
        "dtype": meta.get("dtype"),
        "torch": meta.get("torch"),
    }
    files.write_json(path, table, indent=2)
    load_table.cache_clear()
    return classes


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="bench JSON of a full-size GPU run")
    ap.add_argument("--table", default=None, help=f"dispatch table to update (default {TABLE})")
    a = ap.parse_args(argv)
    for klass, backend in sorted(update_table(a.result, a.table).items()):
        print(f"{klass:16s} -> {backend}")


if __name__ == "__main__":
    main()
