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

    def alpha(self, step: int) -> float:
        return float(self.value)


@dataclass
class FirstK(Schedule):
    k: int = 300
    value: float = 1.0

    def alpha(self, step: int) -> float:
        return float(self.value) if step < self.k else 0.0


@dataclass
class AlphaDecay(Schedule):
    value: float = 1.0
    steps: int = 1000
    final: float = 0.0
    kind: str = "linear"  # linear | cosine | exp

    def __post_init__(self):
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
    then: Schedule | None = None

    @property
    def warmup_steps(self) -> int:  # type: ignore[override]
        return self.k

    def alpha(self, step: int) -> float:
        if step < self.k:
            return float(self.value)
        return 0.0 if self.then is None else self.then.alpha(step - self.k)


def as_schedule(s: Schedule | float | int | None) -> Schedule:
    if s is None:
        return Continuous(1.0)
    if isinstance(s, (int, float)):
        return Continuous(float(s))
    if not isinstance(s, Schedule):
        raise TypeError(f"expected a Schedule or a number, got {type(s).__name__}")
    return s
