"""Measured backend choice for ``backend="auto"``: which GPU backend was fastest, per device and
per *shape class* of a call, from a committed bench run (``dispatch.json`` beside this file).

A call's shape class is its dominant form and, for sample space, its sample-count bucket
(``"sample:n<=256"``, ``"feature"``): the canonical workloads W1-W5 fall into distinct classes
except W1/W2, which share one. ``python -m guidance_kernels.bench.dispatch RESULT.json`` writes the
winners of a GPU bench run into the table; devices or classes that are not in it fall back to the
static ``priority`` of each backend.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Optional, Sequence

from torch import Tensor

TABLE = pathlib.Path(__file__).with_name("dispatch.json")
_BUCKETS = (64, 128, 256, 512, 1024, 4096)


def shape_class_of(n: int, forms: Sequence[str]) -> str:
    """Class of a call with ``n`` samples whose pairs use ``forms`` (``"sample"``/``"feature"``)."""
    if forms and sum(f == "feature" for f in forms) * 2 > len(forms):
        return "feature"
    for b in _BUCKETS:
        if n <= b:
            return f"sample:n<={b}"
    return f"sample:n>{_BUCKETS[-1]}"


def shape_class(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> str:
    """Class of a call on pairs ``(xs[i], ys[i])`` (2-D, samples first)."""
    from guidance_kernels.functional import choose_form  # the form cost model lives there

    n = xs[0].shape[0]
    return shape_class_of(n, [choose_form(n, x.shape[1], y.shape[1]) for x, y in zip(xs, ys)])


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
