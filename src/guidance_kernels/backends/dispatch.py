"""Measured backend choice for ``backend="auto"``: which GPU backend was fastest, per device and
per *shape class* of a call, from a committed bench run (``dispatch.json`` beside this file).

A call's shape class is its activation dtype, its dominant form and, for sample space, its
sample-count bucket (``"bf16/sample:n<=256"``, ``"bf16/feature"``): the canonical workloads W1-W5
fall into distinct classes except W1/W2, which share one; a bench run in bf16 decides bf16 calls
only. ``python -m guidance_kernels.bench.dispatch RESULT.json`` writes the
winners of a GPU bench run into the table; devices or classes that are not in it fall back to the
static ``priority`` of each backend.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Optional, Sequence

import torch
from torch import Tensor

TABLE = pathlib.Path(__file__).with_name("dispatch.json")
_BUCKETS = (64, 128, 256, 512, 1024, 4096)


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def shape_class_of(n: int, forms: Sequence[str], dtype: str) -> str:
    """Class of a call in ``dtype`` (``"bf16"``, ...) with ``n`` samples whose pairs use
    ``forms`` (``"sample"``/``"feature"``), e.g. ``"bf16/sample:n<=256"``, ``"fp32/feature"``."""
    if forms and sum(f == "feature" for f in forms) * 2 > len(forms):
        return f"{dtype}/feature"
    for b in _BUCKETS:
        if n <= b:
            return f"{dtype}/sample:n<={b}"
    return f"{dtype}/sample:n>{_BUCKETS[-1]}"


def shape_class(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> str:
    """Class of a call on pairs ``(xs[i], ys[i])`` (2-D, samples first; dtype of ``xs[0]``)."""
    from guidance_kernels.functional import choose_form  # the form cost model lives there

    n = xs[0].shape[0]
    forms = [choose_form(n, x.shape[1], y.shape[1]) for x, y in zip(xs, ys)]
    return shape_class_of(n, forms, DTYPE_NAMES.get(xs[0].dtype, str(xs[0].dtype)))


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
