"""The :class:`Guidance` object: alignment of a target network to a frozen guide, in your loop.

    g = Guidance(target, guide, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear))
    for step, (x, y) in enumerate(loader):
        with g.record():                 # target hooks record during the task forward
            logits = target(x)
        loss = F.cross_entropy(logits, y) + g.loss(x, step=step)   # guide runs here, no_grad
        loss.backward(); opt.step(); opt.zero_grad()

The target runs **once** per step: its activations come from the same forward that computes the
task loss. The guide runs in eval mode under ``no_grad``. All pairs go to
:func:`guidance_kernels.guidance_loss` in one call. ``g.loss`` returns ``alpha(step) * Σ_l w_l (1 -
CKA_l)`` (or the Procrustes terms), a 0-dim fp32 tensor; ``g.last_terms`` keeps the detached
per-pair terms for logging (read them at log intervals; nothing here syncs with the host).

Flattening: ``"sample"`` turns every activation ``(n, ...)`` into ``(n, prod(...))``;
``"token"`` turns ``(n, ..., D)`` into ``(n*..., D)`` (per-token CKA for sequence models; both
sides then need the same number of tokens per sample).

Padding: ``g.loss(x, step, mask=attention_mask)`` excludes the rows whose mask is 0 (tokens for
``"token"``, samples for ``"sample"``) from every pair, on both sides, without a host sync: the
rows are centred over the kept rows and the dropped rows set to zero (:func:`masked_center`).
The centred matrix then has zero column means, so the kernels' own centring leaves it unchanged
and ``X^T Y`` sums over the kept rows only: CKA and the Procrustes metrics equal their values on
the kept rows exactly. Boolean indexing would do the same but needs a host sync for the output
shape. The debiased estimator depends on the row count ``n`` itself, so it refuses a mask.

Distributed (see :mod:`guidance_kernels.train.distributed`): ``gather="rank"`` (default) computes
the loss on each rank's shard; ``gather="global"`` all-gathers activations (differentiably for
the target) and computes the exact loss over the global batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import guidance_kernels as gk
from guidance_kernels.train.hooks import ActivationRecorder
from guidance_kernels.train.mapping import map_layers, select_layers
from guidance_kernels.train.schedules import Schedule, as_schedule


def flatten_activation(x: Tensor, how: str) -> Tensor:
    """``"sample"``: (n, ...) -> (n, prod(...)); ``"token"``: (n, ..., D) -> (n*..., D)."""
    if how == "sample":
        return x.reshape(x.shape[0], -1)
    if how == "token":
        return x.reshape(-1, x.shape[-1])
    raise ValueError(f"flatten must be 'sample' or 'token', got {how!r}")


def masked_center(x: Tensor, keep: Tensor) -> Tensor:
    """Rows of ``x`` (N, D) centred over the rows where ``keep`` (N,) bool is True; the other
    rows become 0. Result fp32 (fp64 for fp64 input). No host sync; an all-False mask gives
    zeros (the metric's degenerate, finite value)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    k = keep.reshape(-1, 1)
    xs = torch.where(k, x.to(dt), torch.zeros((), dtype=dt, device=x.device))
    count = keep.sum().clamp_min(1).to(dt)
    mu = xs.sum(dim=0, keepdim=True) / count
    return torch.where(k, xs - mu, torch.zeros((), dtype=dt, device=x.device))


class Guidance:
    """Guidance loss between ``target`` and a frozen ``guide``.

    Args:
        target, guide: the models (DDP-wrapped targets are unwrapped for layer names).
        target_layers, guide_layers: selection (``"auto"``, type(s), names, or a callable);
            see :func:`guidance_kernels.train.mapping.select_layers`.
        mapping: explicit ``{target: guide}`` dict or ``[(target, guide), ...]``; default is the
            even spread by depth (:func:`~guidance_kernels.train.mapping.map_layers`).
        guide_deeper: ``"all"`` (keep every pair) or ``"spread"`` when the guide has more layers.
        alpha: a number (continuous) or a :class:`Schedule`.
        weights: per-pair weights (length = number of pairs).
        metric: ``"cka"``, ``"debiased_cka"``, ``"procrustes"`` or ``"angular_procrustes"``.
        flatten: ``"sample"`` or ``"token"``.
        reduction: ``"sum"`` (paper) or ``"mean"`` over pairs.
        guide_input: optional callable mapping the target's input to the guide's input.
        gather: ``"rank"`` or ``"global"`` (distributed only).
    """

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        *,
        target_layers="auto",
        guide_layers="auto",
        mapping=None,
        guide_deeper: str = "all",
        alpha: Schedule | float = 1.0,
        weights: Optional[Sequence[float]] = None,
        metric: str = "cka",
        flatten: str = "sample",
        reduction: str = "sum",
        backend: str = "auto",
        guide_input: Optional[Callable[[Tensor], Tensor]] = None,
        gather: str = "rank",
        group=None,
    ):
        if metric not in gk.METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {gk.METRICS}")
        if flatten not in ("sample", "token"):
            raise ValueError(f"flatten must be 'sample' or 'token', got {flatten!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if gather not in ("rank", "global"):
            raise ValueError(f"gather must be 'rank' or 'global', got {gather!r}")
        t_sel = select_layers(target, target_layers, what="target")
        g_sel = select_layers(guide, guide_layers, what="guide")
        if mapping is not None:
            # explicit names may lie outside the type selection: select what the mapping names
            pairs_in = list(mapping.items()) if isinstance(mapping, dict) else list(mapping)
            t_sel = select_layers(target, list(dict.fromkeys(t for t, _ in pairs_in)), what="target")
            g_sel = select_layers(guide, list(dict.fromkeys(g for _, g in pairs_in)), what="guide")
        self.pairs = map_layers(t_sel, g_sel, mapping, guide_deeper=guide_deeper)
        if weights is not None and len(weights) != len(self.pairs):
            raise ValueError(f"{len(weights)} weights for {len(self.pairs)} layer pairs")
        self.target, self.guide = target, guide
        self.schedule = as_schedule(alpha)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.metric, self.flatten, self.reduction, self.backend = metric, flatten, reduction, backend
        self.guide_input = guide_input
        self.gather, self.group = gather, group
        t_names = list(dict.fromkeys(t for t, _ in self.pairs))
        g_names = list(dict.fromkeys(g for _, g in self.pairs))
        self._t_idx = [t_names.index(t) for t, _ in self.pairs]
        self._g_idx = [g_names.index(g) for _, g in self.pairs]
        self._target_rec = ActivationRecorder(target, t_names)
        self._guide_rec = ActivationRecorder(guide, g_names)
        self.last_terms: Optional[Tensor] = None

    # ------------------------------------------------------------------ recording
    def record(self):
        """Context: the target's selected layers are recorded during this forward."""
        return self._target_rec.recording()

    def alpha(self, step: Optional[int]) -> float:
        return self.schedule.alpha(0 if step is None else step)

    @torch.no_grad()
    def guide_activations(self, x: Tensor) -> list[Tensor]:
        was_training = self.guide.training
        self.guide.eval()
        try:
            with self._guide_rec.recording():
                self.guide(self.guide_input(x) if self.guide_input is not None else x)
            return self._guide_rec.take()
        finally:
            self.guide.train(was_training)

    # ------------------------------------------------------------------ the loss
    def terms(self, guide_x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Weighted per-pair terms ``(L,)`` from the recorded target forward and the guide on
        ``guide_x`` (the same batch the target saw). Consumes the recorded activations.
        ``mask``: rows to keep (nonzero) — ``(n, T)`` (an attention mask) for ``"token"``,
        ``(n,)`` for ``"sample"``; see the module docstring."""
        if mask is not None and self.metric == "debiased_cka":
            raise ValueError(
                "mask: the debiased CKA estimator depends on the row count and cannot exclude "
                "padded rows by zeroing; use metric='cka' or a procrustes metric with a mask"
            )
        t_acts = self._target_rec.take()
        g_acts = self.guide_activations(guide_x)
        if self.gather == "global":
            from guidance_kernels.train.distributed import gather_batch

            t_acts = gather_batch(t_acts, group=self.group, differentiable=True)
            g_acts = gather_batch(g_acts, group=self.group, differentiable=False)
            if mask is not None:
                mask = gather_batch([mask], group=self.group, differentiable=False)[0]
        xs = [flatten_activation(t_acts[i], self.flatten) for i in self._t_idx]
        # a guide layer mapped to several target layers is flattened (and masked) once, so the
        # loss sees one tensor and computes its Gram once
        flat_g = {i: flatten_activation(g_acts[i], self.flatten) for i in dict.fromkeys(self._g_idx)}
        ys = [flat_g[i] for i in self._g_idx]
        for (tn, gn), x, y in zip(self.pairs, xs, ys):
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"pair ({tn!r}, {gn!r}): {x.shape[0]} target rows vs {y.shape[0]} guide rows "
                    f"after {self.flatten!r} flattening"
                )
            if mask is not None and mask.numel() != x.shape[0]:
                raise ValueError(
                    f"pair ({tn!r}, {gn!r}): mask of shape {tuple(mask.shape)} for {x.shape[0]} "
                    f"rows after {self.flatten!r} flattening (token: the (n, T) attention mask; "
                    "sample: (n,))"
                )
        if mask is not None:
            keep = mask.reshape(-1) != 0
            xs = [masked_center(x, keep) for x in xs]
            centred = {i: masked_center(y, keep) for i, y in flat_g.items()}
            ys = [centred[i] for i in self._g_idx]
        terms = gk.guidance_loss(
            xs, ys, metric=self.metric, weights=self.weights, reduction="none", backend=self.backend
        )
        self.last_terms = terms.detach()
        return terms

    def loss(self, guide_x: Tensor, step: Optional[int] = None, *, mask: Optional[Tensor] = None) -> Tensor:
        """``alpha(step) * reduce(terms)``: add it to the task loss. When alpha is 0 the guide is
        not run and a zero is returned (the recorded activations are dropped). ``mask``: see
        :meth:`terms`."""
        a = self.alpha(step)
        if a == 0.0:
            self._target_rec.outputs = {}
            return torch.zeros((), device=guide_x.device)
        terms = self.terms(guide_x, mask)
        red = terms.sum() if self.reduction == "sum" else terms.mean()
        return a * red

    def __call__(self, guide_x: Tensor, step: Optional[int] = None, *, mask: Optional[Tensor] = None) -> Tensor:
        return self.loss(guide_x, step, mask=mask)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove every hook from target and guide."""
        self._target_rec.close()
        self._guide_rec.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        lines = [f"{len(self.pairs)} pairs, metric={self.metric}, flatten={self.flatten}"]
        lines += [f"  {t:>12} <- {g}" for t, g in self.pairs]
        return "\n".join(lines)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: ``T² · KL(softmax(teacher/T) || softmax(student/T))``, batch mean, fp32."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


class KD:
    """Knowledge-distillation baseline arm: ``alpha(step) * kd_loss(student, teacher(x))`` with
    the teacher frozen in eval mode under ``no_grad``."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: Schedule | float = 1.0):
        self.teacher, self.temperature = teacher, float(temperature)
        self.schedule = as_schedule(alpha)

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        was = self.teacher.training
        self.teacher.eval()
        try:
            return self.teacher(x)
        finally:
            self.teacher.train(was)

    def loss(self, x: Tensor, student_logits: Tensor, step: Optional[int] = None) -> Tensor:
        a = self.schedule.alpha(0 if step is None else step)
        if a == 0.0:
            return torch.zeros((), device=student_logits.device)
        return a * kd_loss(student_logits, self.teacher_logits(x), self.temperature)
