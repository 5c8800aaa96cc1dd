"""Input validation for the public API. Reads shapes, dtypes and devices only (no host sync).
Every error names the pair (or list position) and the problem."""

from __future__ import annotations

import math

from typing import Optional, Sequence

import torch
from torch import Tensor


def _as_list(seq, name: str) -> list:
    if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    return list(seq)


def check_tensor(t, where: str, min_n: int = 2) -> None:
    """One representation: a float tensor (n, features...) with n >= min_n and features >= 1."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{where}: nested tensors are not supported; pad them to a dense (n, features...) tensor")
    if t.layout != torch.strided:
        raise TypeError(
            f"{where}: expected a dense (strided) tensor, got layout {t.layout}; convert it with "
            f".to_dense()"
        )
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(
            f"{where}: expected shape (n, features...) with at least 2 dims, got {tuple(t.shape)}"
        )
    if t.shape[0] < min_n:
        raise ValueError(f"{where}: needs at least {min_n} samples, got n = {t.shape[0]}")
    if t[0].numel() == 0:
        raise ValueError(f"{where}: has no features (shape {tuple(t.shape)})")


def flatten(t: Tensor) -> Tensor:
    """(n, ...) -> (n, prod(...)): a view for contiguous input, one copy otherwise."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def check_pairs(targets, guides, *, min_n: int = 2) -> tuple[list[Tensor], list[Tensor]]:
    """Validate equal-length lists of paired representations; return them flattened to 2-D."""
    xs, ys = _as_list(targets, "targets"), _as_list(guides, "guides")
    if len(xs) != len(ys):
        raise ValueError(f"targets and guides differ in length: {len(xs)} vs {len(ys)}")
    if not xs:
        raise ValueError("targets and guides are empty: need at least one layer pair")
    device = None
    for i, (x, y) in enumerate(zip(xs, ys)):
        check_tensor(x, f"pair {i} (target)", min_n)
        check_tensor(y, f"pair {i} (guide)", min_n)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"pair {i}: target and guide have different numbers of samples "
                f"({x.shape[0]} vs {y.shape[0]}); dim 0 must be the sample dimension"
            )
        if x.device != y.device:
            raise ValueError(f"pair {i}: target is on {x.device} but guide is on {y.device}")
        if device is None:
            device = x.device
        elif x.device != device:
            raise ValueError(f"pair {i}: on {x.device}, but pair 0 is on {device}; use one device")
    return [flatten(x) for x in xs], [flatten(y) for y in ys]


def check_list(xs, name: str, *, min_n: int = 2) -> list[Tensor]:
    """Validate a list of representations that share n and device (for similarity matrices)."""
    xs = _as_list(xs, name)
    if not xs:
        raise ValueError(f"{name} is empty")
    for i, x in enumerate(xs):
        check_tensor(x, f"{name}[{i}]", min_n)
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(f"{name}[{i}] has n = {x.shape[0]} but {name}[0] has n = {xs[0].shape[0]}")
        if x.device != xs[0].device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {name}[0] is on {xs[0].device}")
    return [flatten(x) for x in xs]


def _weight_value(w, i: int) -> float:
    if isinstance(w, bool) or w is None or isinstance(w, (str, bytes)):
        raise TypeError(f"weights[{i}] (pair {i}) must be a real number, got {type(w).__name__} {w!r}")
    if isinstance(w, Tensor):
        if w.numel() != 1 or w.is_complex() or w.device.type == "meta":
            raise TypeError(f"weights[{i}] (pair {i}) must be a real number, got a tensor {tuple(w.shape)} {w.dtype} on {w.device}")
        w = w.detach().cpu().item()  # a Python list's entries live on the host anyway
    if isinstance(w, complex):
        raise TypeError(f"weights[{i}] (pair {i}) must be a real number, got complex {w!r}")
    try:
        return float(w)
    except (TypeError, ValueError):
        raise TypeError(f"weights[{i}] (pair {i}) must be a real number, got {type(w).__name__} {w!r}") from None


def _check_values(vals: Sequence[float]) -> None:
    for i, w in enumerate(vals):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] (pair {i}) = {w}: weights must be finite and non-negative")


def weight_values(weights) -> tuple[float, ...]:
    """Per-pair weights given ahead of the pairs (e.g. to a module) as a tuple of floats, each a
    finite, non-negative real number (errors name the entry); the count is checked per call."""
    if isinstance(weights, Tensor):
        if weights.is_complex() or weights.dtype == torch.bool or weights.dim() != 1:
            raise TypeError(f"weights must be a 1-D real tensor or a list of numbers, got {weights.dtype} {tuple(weights.shape)}")
        weights = list(weights.unbind(0))
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"weights must be a list or tuple of numbers, got {type(weights).__name__}")
    vals = [_weight_value(w, i) for i, w in enumerate(_as_list(weights, "weights"))]
    _check_values(vals)
    return tuple(vals)


def check_weights(weights, count: int, like: Tensor) -> Optional[Tensor]:
    """Per-pair weights ``(count,)`` as ``like``'s dtype and device, or None. A list/tuple of real
    numbers, or a 1-D real tensor on ``like``'s device or the CPU. Values (finite, >= 0) are
    checked for lists and CPU tensors; a tensor on an accelerator (or under ``torch.compile``) is
    not read (no host sync)."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if weights.is_nested or weights.layout != torch.strided:
            raise TypeError(f"weights must be a dense tensor, got layout {weights.layout}")
        if weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(f"weights must be real, got dtype {weights.dtype}")
        if weights.dim() != 1 or weights.shape[0] != count:
            raise ValueError(f"weights must have shape ({count},) for {count} pairs, got {tuple(weights.shape)}")
        if weights.device.type == "meta" and like.device.type != "meta":
            raise ValueError("weights is a meta tensor (no data); pass real numbers")
        if weights.device.type != "cpu" and weights.device != like.device:
            raise ValueError(f"weights are on {weights.device} but the pairs are on {like.device}")
        if weights.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_values(weights.detach().double().tolist())
        return weights.to(device=like.device, dtype=like.dtype)
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"weights must be a list or tuple of numbers, got {type(weights).__name__}")
    weights = _as_list(weights, "weights")
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries for {count} layer pairs")
    vals = [_weight_value(w, i) for i, w in enumerate(weights)]
    _check_values(vals)
    return torch.tensor(vals, dtype=like.dtype, device=like.device)
