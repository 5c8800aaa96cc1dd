"""Planning policy shared by :mod:`.functional`, :mod:`.ops` and the backends: which form a
pair is computed in (the cost model), which dtype products accumulate in, which dtype scores
are returned in, how layers are grouped into one op call, de-duplicated and reassembled, and
the shape class the measured dispatch is keyed by. Math and rules: ``docs/design.md``.

This module sits below every other module of the package and imports none of them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Hashable, Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "score_dtype",
    "promoted_dtype",
    "no_autocast",
    "choose_form",
    "group_by",
    "unique",
    "assemble",
    "shape_class",
    "shape_class_of",
    "DTYPE_NAMES",
]


# --------------------------------------------------------------------------- dtypes
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for activations of ``dtype``: fp64 stays fp64, all else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def promoted_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """fp64 if any of ``dtypes`` is fp64, else fp32: the one rule for results built from mixed
    inputs (scores, stacked Grams)."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def score_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """Dtype of returned scores: fp64 if any input is fp64, else fp32."""
    return promoted_dtype(t.dtype for t in tensors)


def no_autocast(device: torch.device | str):
    """Context that disables autocast on ``device``'s type (a no-op on other device types)."""
    device_type = torch.device(device).type
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- cost model
def choose_form(n: int, p: int, q: int) -> str:
    """``"feature"`` (``p x q`` cross-covariances) when ``n (p + q) > p² + pq + q²``, else
    ``"sample"`` (``n x n`` Grams): the cost model of ``docs/design.md``."""
    return "feature" if n * (p + q) > p * p + p * q + q * q else "sample"


# --------------------------------------------------------------------------- grouping
def group_by(items: Sequence, key: Optional[Callable[..., Hashable]] = None) -> dict:
    """``key(item)`` (the item itself when ``key`` is None) -> positions of the items with that
    key, in first-seen order."""
    out: dict = {}
    for i, it in enumerate(items):
        out.setdefault(it if key is None else key(it), []).append(i)
    return out


def unique(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Distinct tensors (by identity) and, for each input, its index among them."""
    uniq: list[Tensor] = []
    index = []
    for t in tensors:
        for j, u in enumerate(uniq):
            if u is t:
                index.append(j)
                break
        else:
            index.append(len(uniq))
            uniq.append(t)
    return uniq, index


def assemble(parts: list[tuple[list[int], Tensor]], total: int) -> Tensor:
    """Per-pair scores ``(total,)`` from groups ``(positions, scores)`` in pair order; no copy for
    one group in order (the common case), one ``cat`` for groups in order."""
    order = [i for idx, _ in parts for i in idx]
    s = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
    if order == list(range(total)):
        return s
    inv = [0] * total
    for j, i in enumerate(order):
        inv[i] = j
    return torch.stack([s[j] for j in inv])


# --------------------------------------------------------------------------- shape class
_BUCKETS = (64, 128, 256, 512, 1024, 4096)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def shape_class_of(n: int, forms: Sequence[str], dtype: str) -> str:
    """Class of a call in ``dtype`` (``"bf16"``, ...) with ``n`` samples whose pairs use
    ``forms`` (``"sample"``/``"feature"``), e.g. ``"bf16/sample:n<=256"``, ``"fp32/feature"``:
    the key of the measured dispatch table (:mod:`.backends.dispatch`)."""
    if forms and sum(f == "feature" for f in forms) * 2 > len(forms):
        return f"{dtype}/feature"
    for b in _BUCKETS:
        if n <= b:
            return f"{dtype}/sample:n<={b}"
    return f"{dtype}/sample:n>{_BUCKETS[-1]}"


def shape_class(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> str:
    """Class of a call on pairs ``(xs[i], ys[i])`` (2-D, samples first; dtype of ``xs[0]``)."""
    n = xs[0].shape[0]
    forms = [choose_form(n, x.shape[1], y.shape[1]) for x, y in zip(xs, ys)]
    return shape_class_of(n, forms, DTYPE_NAMES.get(xs[0].dtype, str(xs[0].dtype)))
