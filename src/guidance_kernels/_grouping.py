"""Grouping of list positions by a key, shared by the ops, ``functional`` and the backends."""

from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence


def group_by(items: Sequence, key: Optional[Callable[..., Hashable]] = None) -> dict:
    """``key(item)`` (the item itself when ``key`` is None) -> positions of the items with that
    key, in first-seen order."""
    out: dict = {}
    for i, it in enumerate(items):
        out.setdefault(it if key is None else key(it), []).append(i)
    return out
