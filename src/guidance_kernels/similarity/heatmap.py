"""Labeled CKA heatmaps, drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no display, the
global backend is left alone)."""

from __future__ import annotations

import matplotlib.patches
from matplotlib.figure import Figure

from typing import Optional, Sequence

import numpy as np

from guidance_kernels.files import save_figure

__all__ = ["plot_heatmap", "plot_before_after"]


def _short(names: Sequence[str], limit: int = 18) -> list[str]:
    return [n if len(n) <= limit else "…" + n[-(limit - 1):] for n in names]


def _ticks(ax, axis: str, labels: Sequence[str]) -> None:
    n = len(labels)
    step = max(1, int(np.ceil(n / 40)))  # at most ~40 labels per axis
    idx = list(range(0, n, step))
    fs = 9 if n <= 12 else (7 if n <= 24 else 6)
    if axis == "x":
        ax.set_xticks(idx)
        ax.set_xticklabels([labels[i] for i in idx], rotation=90, fontsize=fs)
    else:
        ax.set_yticks(idx)
        ax.set_yticklabels([labels[i] for i in idx], fontsize=fs)


def _draw(ax, m: np.ndarray, rows, cols, title, *, vmin, vmax, cmap, mapping, annotate,
          mark: str = "cyan"):
    im = ax.imshow(m, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    _ticks(ax, "x", _short(cols))
    _ticks(ax, "y", _short(rows))
    if mapping:
        title += "\n(outlined: the trainer's layer mapping)"
    ax.set_title(title, fontsize=10)
    R, C = m.shape
    if annotate is None:
        annotate = R * C <= 160
    if annotate:
        fs = 8 if R * C <= 64 else 6
        for i in range(R):
            for j in range(C):
                v = m[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fs,
                        color="black" if (v - vmin) / max(vmax - vmin, 1e-12) > 0.6 else "white")
    if mapping:
        ri, ci = zip(*mapping)
        for r, c in zip(ri, ci):
            ax.add_patch(matplotlib.patches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False,
                                                      edgecolor=mark, linewidth=2.0))
    return im


def _size(R: int, C: int, panels: int = 1) -> tuple[float, float]:
    w = min(22.0, max(5.0, 0.32 * C + 2.8)) * panels
    h = min(16.0, max(4.0, 0.32 * R + 2.4))
    return w, h


def plot_heatmap(
    matrix,
    rows: Sequence[str],
    cols: Sequence[str],
    path: str,
    *,
    name_a: str = "model A",
    name_b: str = "model B",
    title: Optional[str] = None,
    vmin: Optional[float] = None,
    vmax: float = 1.0,
    cmap: str = "magma",
    mapping: Optional[Sequence[tuple[int, int]]] = None,
    annotate: Optional[bool] = None,
    dpi: int = 120,
) -> str:
    """Write a heatmap of ``matrix`` (rows: layers of A, bottom = first; columns: layers of B)
    to ``path``. ``mapping``: (row, col) cells to outline (e.g. the trainer's layer pairs).
    ``vmin`` defaults to 0 (or the minimum when the unbiased estimate goes below 0)."""
    m = np.asarray(matrix, dtype=float)
    if vmin is None:
        vmin = min(0.0, float(np.floor(m.min() * 10) / 10))
    fig = Figure(figsize=_size(*m.shape))
    ax = fig.subplots()
    im = _draw(ax, m, rows, cols, title or f"linear CKA (minibatch, unbiased): {name_a} vs {name_b}",
               vmin=vmin, vmax=vmax, cmap=cmap, mapping=mapping, annotate=annotate)
    ax.set_xlabel(f"{name_b} layers", fontsize=10)
    ax.set_ylabel(f"{name_a} layers", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="CKA")
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
    return path


def plot_before_after(before, after, rows, cols, path, *, name_a="guide", name_b="target",
                      mapping=None, title: str = "", dpi: int = 110) -> str:
    """Three panels: CKA before, after a guided run, and the change (after - before)."""
    b, a = np.asarray(before, float), np.asarray(after, float)
    d = a - b
    vmin = min(0.0, float(np.floor(min(b.min(), a.min()) * 10) / 10))
    w, h = _size(*b.shape, panels=3)
    fig = Figure(figsize=(min(w, 30), h))
    axes = fig.subplots(1, 3)
    for ax, m, t, kw in (
        (axes[0], b, "before guided training", dict(vmin=vmin, vmax=1.0, cmap="magma")),
        (axes[1], a, "after guided training", dict(vmin=vmin, vmax=1.0, cmap="magma")),
        (axes[2], d, "change (after - before)",
         dict(vmin=-max(abs(d).max(), 1e-3), vmax=max(abs(d).max(), 1e-3), cmap="RdBu_r", mark="black")),
    ):
        im = _draw(ax, m, rows, cols, t, mapping=mapping, annotate=None, **kw)
        ax.set_xlabel(f"{name_b} layers", fontsize=9)
        ax.set_ylabel(f"{name_a} layers", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
    return path
