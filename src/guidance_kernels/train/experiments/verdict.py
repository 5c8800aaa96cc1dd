"""Verdict rules of the main job, fixed before the first full run (do not change after looking).

Every claim compares final test accuracies (one number per seed and arm, fractions in [0, 1]).

* "A beats B": the difference of means ``d = mean(A) - mean(B)`` is above ``MARGIN`` and above
  two standard errors of the difference, ``2 * sqrt(sd_A²/n_A + sd_B²/n_B)`` (sample standard
  deviations, ddof = 1).
* (a) guided beats alone (judged per guide: trained and untrained, per experiment).
* (b) guidance from an *untrained* guide beats KD from the same untrained teacher.
* (c) the noise warm-up keeps >= ``KEEP`` of continuous guidance's gain with the same guide:
  ``(mean(warmup) - mean(alone)) / (mean(guided) - mean(alone)) >= KEEP``; judged only where
  continuous guidance beats alone.

Not judged (``holds is None``), never "does not hold": fewer than 2 seeds on either side, or a
non-finite accuracy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

MARGIN = 0.02   # 2 percentage points of accuracy
KEEP = 0.5      # (c): share of the continuous gain the warm-up must keep


def mean_sd(v: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for fewer than 2 values)."""
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    m = sum(v) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))


def _why_not_judged(*groups: Sequence[float]) -> Optional[str]:
    if min(len(g) for g in groups) < 2:
        n = min(len(g) for g in groups)
        return f"not judged: {n} seed{'s' if n != 1 else ''}"
    if not all(math.isfinite(x) for g in groups for x in g):
        return "not judged: a non-finite accuracy"
    return None


def beats(a: Sequence[float], b: Sequence[float], margin: float = MARGIN) -> dict:
    """Whether ``a`` beats ``b``: ``{"holds": bool | None, "diff", "two_se", "note"}``."""
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    diff = ma - mb
    why = _why_not_judged(a, b)
    if why:
        return {"holds": None, "diff": diff, "two_se": math.nan, "note": why}
    two_se = 2.0 * math.sqrt(sa * sa / len(a) + sb * sb / len(b))
    holds = diff > margin and diff > two_se
    return {"holds": bool(holds), "diff": diff, "two_se": two_se, "note": ""}


def _pts(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{100 * x:+.1f} pts".replace("-0.0 ", "+0.0 ")


def _mark(holds: Optional[bool], note: str) -> str:
    return {True: "holds", False: "does NOT hold"}.get(holds, note or "not judged")


def claim_beats(claim: str, label: str, a_name: str, b_name: str, acc: dict) -> dict:
    """A verdict dict for "``a_name`` beats ``b_name``" on ``acc`` (arm -> per-seed accuracies)."""
    r = beats(acc[a_name], acc[b_name])
    se = "" if not math.isfinite(r["two_se"]) else f", 2 s.e. {100 * r['two_se']:.1f} pts"
    text = (f"({claim}) {label}: {a_name} vs {b_name} {_pts(r['diff'])}{se}, "
            f"margin {100 * MARGIN:.0f} pts -> {_mark(r['holds'], r['note'])}")
    return {"claim": claim, "holds": r["holds"], "diff": r["diff"], "two_se": r["two_se"],
            "arms": [a_name, b_name], "text": text}


def _share(frac: float) -> str:
    if not math.isfinite(frac):
        return "n/a"
    if frac < 0:
        return "none (warm-up below alone)"
    if frac > 1.5:
        return "more than 150 %"
    return f"{100 * frac:.0f} %"


def claim_keeps(claim: str, warm: str, cont: str, alone: str, acc: dict) -> dict:
    """(c): ``warm`` keeps >= KEEP of the gain of ``cont`` over ``alone``."""
    base = beats(acc[cont], acc[alone])
    why = _why_not_judged(acc[warm], acc[cont], acc[alone])
    m_alone = mean_sd(acc[alone])[0]
    g_warm = mean_sd(acc[warm])[0] - m_alone
    g_cont = base["diff"]
    frac = g_warm / g_cont if (math.isfinite(g_cont) and g_cont > 0) else math.nan
    if why:
        holds, note = None, why
    elif not base["holds"]:
        holds, note = None, f"not judged: {cont} does not beat {alone}"
    else:
        holds, note = bool(frac >= KEEP), ""
    text = (f"({claim}) warm-up keeps the gain: {warm} {_pts(g_warm)} vs {cont} {_pts(g_cont)} "
            f"over {alone}, kept {_share(frac)} (needs {100 * KEEP:.0f} %) -> {_mark(holds, note)}")
    return {"claim": claim, "holds": holds, "kept": frac, "gain_warmup": g_warm,
            "gain_continuous": g_cont, "arms": [warm, cont, alone], "text": text}
