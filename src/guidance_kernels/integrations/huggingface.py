"""Guidance for the Hugging Face ``transformers.Trainer``: :class:`GuidedTrainer`.

Replace ``Trainer`` by ``GuidedTrainer`` and name the guide::

    trainer = GuidedTrainer(
        model=model, args=args, train_dataset=ds, data_collator=collate,
        guide=guide,                                                  # frozen, never optimised
        guidance=dict(target_layers="transformer.h.*", guide_layers=nn.LSTM,
                      flatten="token", alpha=FirstK(300)),
    )
    trainer.train()

Why a subclass: ``compute_loss`` is the Trainer's documented extension point for the loss; a
callback cannot add to it. The override records the target's layers during the Trainer's own
forward (the model runs once), runs the guide under ``no_grad`` on ``inputs[guide_input]``, and
adds ``alpha(state.global_step) * Σ (1 - CKA)``. With ``flatten="token"`` the batch's
``attention_mask`` excludes padding tokens from the CKA (exactly, without a host sync; see
:mod:`guidance_kernels.train.guidance`).

Gradient accumulation: the term is a per-micro-batch mean, so it is divided by the number of
accumulation steps when the Trainer has already normalised the task loss over the accumulated
batch (``num_items_in_batch``), and left for the Trainer to divide otherwise. DDP (torchrun /
``accelerate launch``): each rank adds its term and DDP averages the gradients; pass
``gather="global"`` for the exact loss over the global batch. The guide is not part of the
model, so it is neither optimised nor saved; it follows the inputs' device.

Logging: per-pair values (``guidance/cka/<target>~<guide>``), ``guidance/loss`` and
``guidance/alpha`` are averaged over the steps since the last log and added to the Trainer's
training logs (``logging_steps``); the sums stay on the device in between (no host sync per step).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from transformers import Trainer

from guidance_kernels.integrations._common import follow_device, freeze, pair_keys, pair_values
from guidance_kernels.train.guidance import Guidance


class GuidedTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss adds the guidance term.

    Args:
        guide: the frozen guide network (called as ``guide(inputs[guide_input])``).
        guidance: :class:`~guidance_kernels.train.Guidance` options (``target_layers``,
            ``guide_layers``, ``mapping``, ``alpha``, ``metric``, ``flatten``, ``gather``, ...);
            layer names are those of ``model``.
        guide_input: the batch key fed to the guide, or a callable ``inputs -> tensor``.
        mask_key: the batch key of the padding mask used with ``flatten="token"`` (None: none).
        log_prefix: prefix of the logged keys.
        *args, **kwargs: the ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        guide: nn.Module,
        guidance: Optional[dict] = None,
        guide_input: str | Callable[[dict], Tensor] = "input_ids",
        mask_key: Optional[str] = "attention_mask",
        log_prefix: str = "guidance",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if self.model is None or kwargs.get("model_init") is not None:
            raise ValueError("GuidedTrainer: pass model=... (model_init is not supported: the "
                             "guidance hooks are placed on the model at construction)")
        if not isinstance(guide, nn.Module):
            raise TypeError(f"GuidedTrainer: guide must be an nn.Module, got {type(guide).__name__}")
        self.guide = freeze(guide)
        self.guidance = Guidance(self.model, self.guide, **dict(guidance or {}))
        self.guide_input = guide_input
        self.mask_key = mask_key
        self.log_prefix = log_prefix
        self._gk_sums: Optional[Tensor] = None  # (2 + L,): loss, alpha, per-pair values
        self._gk_count = 0

    def _guide_x(self, inputs: dict) -> Tensor:
        if callable(self.guide_input):
            return self.guide_input(inputs)
        if self.guide_input not in inputs:
            raise KeyError(f"GuidedTrainer: guide_input {self.guide_input!r} is not in the batch "
                           f"(keys: {sorted(inputs)})")
        return inputs[self.guide_input]

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with self.guidance.record():
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        step = int(self.state.global_step)
        alpha = self.guidance.alpha(step)
        guide_x = self._guide_x(inputs)
        follow_device(self.guide, guide_x.device)
        mask = None
        if self.guidance.flatten == "token" and self.mask_key is not None:
            mask = inputs.get(self.mask_key)
        g = self.guidance.loss(guide_x, step, mask=mask)
        if alpha != 0.0:
            self._accumulate(g, alpha)
            if self._loss_scaled_for_ga(num_items_in_batch):
                ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                g = g / ga
            loss = loss + g
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, g: Tensor, alpha: float) -> None:
        values = pair_values(self.guidance, self.guidance.last_terms)
        row = torch.cat([torch.stack([g.detach().float(), g.new_tensor(alpha, dtype=torch.float32)]),
                         values.to(torch.float32)])
        self._gk_sums = row if self._gk_sums is None else self._gk_sums + row
        self._gk_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the guidance means since the last log to the training logs (one host sync here)."""
        if self._gk_count and "loss" in logs:
            mean = (self._gk_sums / self._gk_count).tolist()
            keys = [f"{self.log_prefix}/loss", f"{self.log_prefix}/alpha"]
            keys += pair_keys(self.guidance, self.log_prefix)
            logs = {**logs, **dict(zip(keys, mean))}
            self._gk_sums, self._gk_count = None, 0
        super().log(logs, *args, **kwargs)
