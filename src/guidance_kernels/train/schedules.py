"""When guidance is on and how strong: ``alpha(step)`` and the phase of each step.

All schedules are pure functions of the global step (no state), so a resumed run sees exactly the
alphas of an uninterrupted one. ``phase(step)`` is ``"noise"`` for the steps of a noise warm-up
(the trainer then feeds random-noise inputs and optimises the guidance loss alone) and
``"task"`` otherwise. Alphas are Python floats: no tensors, no host syncs.

* :class:`Continuous` — ``alpha`` at every step (the paper's default, alpha = 1).
* :class:`FirstK` — ``alpha`` for the first ``k`` steps, then 0 (paper: k = 300).
* :class:`NoiseWarmup` — ``k`` steps of guidance-only alignment on noise, then task training
  with ``then`` (default: no guidance) evaluated at ``step - k``.
* :class:`AlphaDecay` — ``alpha`` decaying to ``final`` over ``steps`` (linear, cosine or
  exponential), ``final`` afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _number(cls: str, name: str, v) -> float:
    """``v`` as a finite float, or a ``ValueError``/``TypeError`` naming the schedule and field."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{cls}.{name} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{cls}.{name} must be finite, got {v!r}")
    return float(v)


def _count(cls: str, name: str, v, minimum: int = 0) -> int:
    """``v`` as an int >= ``minimum``, or an error naming the schedule and field."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{cls}.{name} must be an integer number of steps, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{cls}.{name} must be >= {minimum}, got {v}")
    return v


class Schedule:
    warmup_steps: int = 0

    def alpha(self, step: int) -> float:
        raise NotImplementedError

    def phase(self, step: int) -> str:
        return "noise" if step < self.warmup_steps else "task"

    def active(self, step: int) -> bool:
        """Whether guidance contributes at ``step`` (the trainer skips the guide when not)."""
        return self.alpha(step) != 0.0


@dataclass
class Continuous(Schedule):
    value: float = 1.0

    def __post_init__(self):
        self.value = _number("Continuous", "value", self.value)

    def alpha(self, step: int) -> float:
        return float(self.value)


@dataclass
class FirstK(Schedule):
    k: int = 300
    value: float = 1.0

    def __post_init__(self):
        self.k = _count("FirstK", "k", self.k)
        self.value = _number("FirstK", "value", self.value)

    def alpha(self, step: int) -> float:
        return float(self.value) if step < self.k else 0.0


@dataclass
class AlphaDecay(Schedule):
    value: float = 1.0
    steps: int = 1000
    final: float = 0.0
    kind: str = "linear"  # linear | cosine | exp

    def __post_init__(self):
        self.value = _number("AlphaDecay", "value", self.value)
        self.final = _number("AlphaDecay", "final", self.final)
        self.steps = _count("AlphaDecay", "steps", self.steps, minimum=1)
        if self.kind not in ("linear", "cosine", "exp"):
            raise ValueError(f"kind must be linear, cosine or exp, got {self.kind!r}")
        if self.kind == "exp" and (self.final <= 0 or self.value <= 0):
            raise ValueError("exponential decay needs value > 0 and final > 0")

    def alpha(self, step: int) -> float:
        if step >= self.steps:
            return float(self.final)
        t = step / self.steps
        if self.kind == "linear":
            return self.value + (self.final - self.value) * t
        if self.kind == "cosine":
            return self.final + (self.value - self.final) * 0.5 * (1 + math.cos(math.pi * t))
        return self.value * (self.final / self.value) ** t


@dataclass
class NoiseWarmup(Schedule):
    k: int = 100
    value: float = 1.0
    then: Schedule | float | None = None

    def __post_init__(self):
        self.k = _count("NoiseWarmup", "k", self.k)
        self.value = _number("NoiseWarmup", "value", self.value)
        if self.then is not None:  # a number means a constant alpha after the warm-up
            self.then = as_schedule(self.then, what="NoiseWarmup.then")

    @property
    def warmup_steps(self) -> int:  # type: ignore[override]
        return self.k

    def alpha(self, step: int) -> float:
        if step < self.k:
            return float(self.value)
        return 0.0 if self.then is None else self.then.alpha(step - self.k)


def as_schedule(s: Schedule | float | int | None, what: str = "alpha") -> Schedule:
    """A :class:`Schedule` from a schedule, a finite number (constant alpha) or ``None`` (1.0)."""
    if s is None:
        return Continuous(1.0)
    if isinstance(s, Schedule):
        return s
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if not math.isfinite(s):
            raise ValueError(f"{what} must be finite, got {s!r}")
        return Continuous(float(s))
    raise TypeError(f"{what}: expected a Schedule or a number, got {type(s).__name__} {s!r}")

