"""Measured backend choice for ``backend="auto"``: which GPU backend was fastest, per device and
per *shape class* of a call, from a committed bench run (``dispatch.json`` beside this file).

A call's shape class (:func:`guidance_kernels.planning.shape_class`) is its activation dtype,
its dominant form and, for sample space, its sample-count bucket (``"bf16/sample:n<=256"``, ``"bf16/feature"``): the canonical workloads W1-W5
fall into distinct classes except W1/W2, which share one; a bench run in bf16 decides bf16 calls
only. ``python -m guidance_kernels.bench.dispatch RESULT.json`` writes the
winners of a GPU bench run into the table; devices or classes that are not in it fall back to the
static ``priority`` of each backend. Imported only by ``backend="auto"`` on CUDA.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Optional

TABLE = pathlib.Path(__file__).with_name("dispatch.json")


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE)) -> dict:
    """``{device name: {"classes": {class: backend}, ...}}`` (empty if the file is missing)."""
    p = pathlib.Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text()).get("devices", {})


def measured_choice(device_name: str, klass: Optional[str]) -> Optional[str]:
    """The measured fastest backend for ``klass`` on a device called ``device_name``, or None."""
    if klass is None:
        return None
    entry = load_table().get(device_name)
    if entry is None:
        return None
    return entry.get("classes", {}).get(klass)
