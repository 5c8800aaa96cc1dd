"""Guidance for a Lightning ``LightningModule``: :class:`GuidanceMixin`.

Four added lines::

    class Classifier(GuidanceMixin, L.LightningModule):                    # 1. the mixin
        def __init__(self, guide):
            super().__init__()
            self.net = ...
            self.configure_guidance(guide, target_layers=nn.Conv2d, alpha=FirstK(300))   # 2.

        def training_step(self, batch, batch_idx):
            x, y = batch
            with self.guidance_recording():                                # 3. record in the task forward
                logits = self.net(x)
            return F.cross_entropy(logits, y) + self.guidance_loss(x)       # 4. add the term

Why a mixin and not a callback: Lightning callbacks cannot add to the loss that
``training_step`` returns, and the target's activations must come from the task forward inside
``training_step`` (the target runs once). The mixin keeps everything on the module: the guide is
stored as a plain attribute, not a sub-module, so it is in neither ``parameters()`` (the
optimizer) nor ``state_dict()`` (checkpoints) unless ``save_guide=True``; it is frozen, kept in
eval mode, and follows the module's device on each call (a metadata check, no host sync).

Schedules read ``trainer.global_step`` (optimizer steps taken), which Lightning saves in its
checkpoints and restores on resume, so a resumed run sees the alphas of an uninterrupted one.
Per-pair values (``guidance/cka/<target>~<guide>``), ``guidance/loss`` and ``guidance/alpha``
go through ``self.log(on_step=True, on_epoch=False)``: Lightning keeps the tensors on the device
and converts them only when it writes to the logger (every ``log_every_n_steps``); no host sync
per step. Under Lightning's DDP strategy pass ``gather="global"`` for the exact loss over the
global batch (the process group Lightning set up is used).

The hooks are created at the first :meth:`guidance_recording`, not in ``__init__``, so the
module stays picklable for ``strategy="ddp_spawn"``. If you override ``on_save_checkpoint`` /
``on_load_checkpoint``, call ``super()`` so ``save_guide=True`` keeps working.

This module does not import Lightning: it only uses the hooks a ``LightningModule`` has.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor, nn

from guidance_kernels.integrations._common import follow_device, freeze, pair_keys, pair_values
from guidance_kernels.train.guidance import Guidance

_GUIDE_KEY = "guidance_guide_state_dict"


class GuidanceMixin:
    """Adds guidance to a ``LightningModule``; put it before ``LightningModule`` in the bases."""

    def configure_guidance(
        self,
        guide: nn.Module,
        *,
        target: Optional[nn.Module | str] = None,
        save_guide: bool = False,
        log_prefix: str = "guidance",
        log_pairs: bool = True,
        **guidance_kwargs: Any,
    ) -> None:
        """Set the frozen ``guide`` and the :class:`~guidance_kernels.train.Guidance` options
        (``target_layers``, ``guide_layers``, ``mapping``, ``alpha``, ``metric``, ``flatten``,
        ``gather``, ...). ``target``: the guided network — the module itself (default), a
        sub-module, or the attribute name of one; layer names are relative to it.
        ``save_guide``: also store the guide's weights in checkpoints."""
        if not isinstance(guide, nn.Module):
            raise TypeError(f"configure_guidance: guide must be an nn.Module, got {type(guide).__name__}")
        if isinstance(target, str) and not isinstance(getattr(self, target, None), nn.Module):
            raise ValueError(f"configure_guidance: target {target!r} is not a sub-module of this module")
        # plain attributes: object.__setattr__ bypasses nn.Module registration, so the guide is
        # neither a parameter source for the optimizer nor part of state_dict()
        object.__setattr__(self, "_gk_guide", freeze(guide))
        object.__setattr__(self, "_gk_target", target)
        object.__setattr__(self, "_gk_kwargs", dict(guidance_kwargs))
        object.__setattr__(self, "_gk_save_guide", bool(save_guide))
        object.__setattr__(self, "_gk_prefix", log_prefix)
        object.__setattr__(self, "_gk_log_pairs", bool(log_pairs))
        object.__setattr__(self, "_gk_guidance", None)
        self.guidance  # build once now: bad layer names fail here, not in the first step
        self._gk_close()  # ...but hold no hooks until training (keeps the module picklable)

    # ------------------------------------------------------------------ state
    @property
    def guide(self) -> nn.Module:
        return self._gk_state("_gk_guide")

    @property
    def guidance(self) -> Guidance:
        """The :class:`Guidance` (created, with its hooks, on first use)."""
        g = self._gk_state("_gk_guidance")
        if g is None:
            t = self._gk_target
            target = self if t is None else (getattr(self, t) if isinstance(t, str) else t)
            g = Guidance(target, self._gk_guide, **self._gk_kwargs)
            object.__setattr__(self, "_gk_guidance", g)
        return g

    def _gk_state(self, name: str):
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            raise RuntimeError(
                f"{type(self).__name__}: call self.configure_guidance(guide, ...) in __init__ first"
            ) from None

    def _gk_close(self) -> None:
        g = self._gk_state("_gk_guidance")
        if g is not None:
            g.close()
            object.__setattr__(self, "_gk_guidance", None)

    def __getstate__(self):
        # hooks are closures: drop them when pickled (ddp_spawn); recreated on first use
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_gk_guidance"] = None
        return state

    @property
    def guidance_step(self) -> int:
        """The step the schedule reads: ``trainer.global_step`` (0 without a trainer)."""
        trainer = getattr(self, "_trainer", None)
        return 0 if trainer is None else int(trainer.global_step)

    @property
    def guidance_alpha(self) -> float:
        return self.guidance.alpha(self.guidance_step)

    # ------------------------------------------------------------------ the loss
    def guidance_recording(self):
        """Context: the target's selected layers are recorded during this forward (training
        only; in eval mode nothing is recorded)."""
        if not self.training:
            return contextlib.nullcontext()
        return self.guidance.record()

    def guidance_loss(self, guide_x: Tensor, *, mask: Optional[Tensor] = None) -> Tensor:
        """``alpha(global_step) * reduce(1 - CKA)`` over the pairs, from the forward recorded by
        :meth:`guidance_recording` and the guide on ``guide_x``; logs it. ``mask``: rows to keep
        (e.g. the attention mask with ``flatten="token"``). 0 in eval mode or when alpha is 0."""
        g = self.guidance
        prefix = self._gk_prefix
        alpha = g.alpha(self.guidance_step)
        if not self.training or alpha == 0.0:
            g._target_rec.outputs = {}
            if self.training:
                self.log(f"{prefix}/alpha", alpha, on_step=True, on_epoch=False)
            return torch.zeros((), device=guide_x.device)
        follow_device(self._gk_guide, guide_x.device)
        loss = g.loss(guide_x, self.guidance_step, mask=mask)
        n = int(guide_x.shape[0])
        self.log(f"{prefix}/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=n)
        self.log(f"{prefix}/alpha", alpha, on_step=True, on_epoch=False, batch_size=n)
        if self._gk_log_pairs and g.last_terms is not None:
            values = pair_values(g, g.last_terms)
            for i, key in enumerate(pair_keys(g, prefix)):
                self.log(key, values[i], on_step=True, on_epoch=False, batch_size=n)
        return loss

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        follow_device(self._gk_guide, self.device)
        freeze(self._gk_guide)
        super().on_fit_start()

    def on_fit_end(self) -> None:
        self._gk_close()
        super().on_fit_end()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._gk_save_guide:
            checkpoint[_GUIDE_KEY] = self._gk_guide.state_dict()
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._gk_save_guide and _GUIDE_KEY in checkpoint:
            self._gk_guide.load_state_dict(checkpoint[_GUIDE_KEY])
        super().on_load_checkpoint(checkpoint)
