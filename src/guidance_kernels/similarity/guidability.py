"""Guidability report: how a short guided run changes the guide-vs-target CKA map.

For a guide and a target: the layer-by-layer minibatch CKA map (guide layers = rows, target
layers = columns) on held-out inputs **before** training, then a short guided run with the
trainer (:class:`guidance_kernels.train.Guidance` + :class:`guidance_kernels.train.Trainer`, on a
copy of the target: the model passed in is not modified), then the map **after**, and the layer
mapping the trainer chose (:func:`guidance_kernels.train.mapping.map_layers`: even spread by
depth, or an explicit one). The change ``after - before`` on and off the mapped cells says how
easily each guide layer's representation is imposed on each target layer, and how far the
alignment spreads to neighbouring layers that were not guided directly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidance_kernels.similarity.capture import SimilarityResult, layer_cka, resolve_layers

__all__ = ["GuidabilityReport", "guidability_report"]


@dataclass
class GuidabilityReport:
    guide_layers: list[str]
    target_layers: list[str]
    pairs: list[tuple[str, str]]            # (target layer, guide layer), as the trainer holds them
    before: SimilarityResult
    after: SimilarityResult
    config: dict
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    guidance_loss: list = field(default_factory=list)   # per logged step
    seconds: float = 0.0
    trained_target: Optional[nn.Module] = None

    @property
    def cells(self) -> list[tuple[int, int]]:
        """Mapped (row = guide layer index, col = target layer index) cells."""
        gi = {n: i for i, n in enumerate(self.guide_layers)}
        ti = {n: j for j, n in enumerate(self.target_layers)}
        return [(gi[g], ti[t]) for t, g in self.pairs]

    def pair_rows(self) -> list[dict]:
        b, a = self.before.matrix, self.after.matrix
        return [{"target": t, "guide": g, "before": float(b[i, j]), "after": float(a[i, j]),
                 "change": float(a[i, j] - b[i, j])}
                for (t, g), (i, j) in zip(self.pairs, self.cells)]

    def summary(self) -> dict:
        b, a = self.before.matrix, self.after.matrix
        d = a - b
        mask = torch.zeros_like(d, dtype=torch.bool)
        for i, j in self.cells:
            mask[i, j] = True
        best = a.argmax(1).tolist()
        return {
            "mean_change_mapped": float(d[mask].mean()),
            "mean_change_unmapped": float(d[~mask].mean()) if (~mask).any() else None,
            "best_target_layer_after": {g: self.target_layers[j] for g, j in zip(self.guide_layers, best)},
        }

    def to_dict(self) -> dict:
        return {
            "guide_layers": self.guide_layers, "target_layers": self.target_layers,
            "rows": "guide_layers", "columns": "target_layers",
            "mapping": [{"target": t, "guide": g} for t, g in self.pairs],
            "mapping_cells": self.cells,
            "pairs": self.pair_rows(), "summary": self.summary(),
            "before": self.before.matrix.tolist(), "after": self.after.matrix.tolist(),
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "guidance_loss": self.guidance_loss,
            "config": self.config, "seconds": self.seconds,
            "samples": self.after.samples, "batches": self.after.batches,
        }


@torch.no_grad()
def _accuracy(model: nn.Module, data) -> Optional[float]:
    if data is None or not isinstance(data, (tuple, list)) or len(data) < 2:
        return None
    x, y = data[0], data[1]
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for s in range(0, x.shape[0], 1024):
        correct += (model(x[s:s + 1024].to(dev)).argmax(-1).cpu() == y[s:s + 1024]).sum().item()
    model.train(was)
    return correct / x.shape[0]


def guidability_report(
    guide: nn.Module,
    target: nn.Module,
    train_data: tuple[Tensor, Tensor],
    eval_data: Any,
    *,
    guide_layers: Any = "auto",
    target_layers: Any = "auto",
    mapping=None,
    guide_deeper: str = "all",
    steps: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    alpha: float = 1.0,
    metric: str = "cka",
    task_loss: bool = True,
    seed: int = 0,
    cka_batch_size: int = 256,
    progress: bool = False,
    console=None,
) -> GuidabilityReport:
    """Before/after CKA maps around a short guided run (see module doc).

    ``train_data``: ``(X, y)`` for the trainer. ``eval_data``: inputs (or ``(X, y)``) for the maps
    (held-out data; with labels, accuracy before/after is reported too). ``task_loss=False``
    trains on the guidance loss alone (pure alignment). Layer selections accept what
    :func:`~guidance_kernels.similarity.capture.resolve_layers` accepts."""
    from guidance_kernels.train.guidance import Guidance
    from guidance_kernels.train.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    tgt = copy.deepcopy(target)
    g_names = resolve_layers(guide, guide_layers, what="guide")
    t_names = resolve_layers(tgt, target_layers, what="target")
    guidance = Guidance(tgt, guide, target_layers=t_names, guide_layers=g_names, mapping=mapping,
                        guide_deeper=guide_deeper, alpha=alpha, metric=metric)
    maps = dict(layers_a=g_names, layers_b=t_names, batch_size=cka_batch_size,
                name_a="guide", name_b="target", progress=progress, console=console)
    try:
        before = layer_cka(guide, tgt, eval_data, **maps)
        acc0 = _accuracy(tgt, eval_data)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          eval_every=0, log_every=max(1, min(10, steps)), progress=progress)
        loss_fn = F.cross_entropy if task_loss else (lambda out, y: out.sum() * 0.0)
        trainer = Trainer(tgt, train_data, cfg, guidance=guidance, task_loss=loss_fn,
                          name="guided run")
        hist = trainer.fit()
        after = layer_cka(guide, tgt, eval_data, **maps)
        acc1 = _accuracy(tgt, eval_data)
    finally:
        guidance.close()
    config = {"steps": steps, "batch_size": batch_size, "lr": lr, "alpha": alpha, "metric": metric,
              "task_loss": task_loss, "seed": seed, "guide_deeper": guide_deeper,
              "cka_batch_size": cka_batch_size}
    return GuidabilityReport(
        guide_layers=g_names, target_layers=t_names, pairs=list(guidance.pairs),
        before=before, after=after, config=config, accuracy_before=acc0, accuracy_after=acc1,
        guidance_loss=list(zip(hist.step, hist.guidance)), seconds=time.perf_counter() - t0,
        trained_target=tgt,
    )
