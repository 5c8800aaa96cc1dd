"""``nn.Module`` wrapper of :func:`guidance_kernels.guidance_loss`."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from guidance_kernels import _checks
from guidance_kernels.functional import guidance_loss


class GuidanceLoss(nn.Module):
    """``GuidanceLoss(metric="cka", weights=None, reduction="sum", backend="auto")``;
    ``forward(targets, guides)`` -> 0-dim loss (see :func:`guidance_kernels.guidance_loss`)."""

    def __init__(
        self,
        metric: str = "cka",
        weights: Optional[Sequence[float]] = None,
        reduction: str = "sum",
        backend: str = "auto",
        form: str = "auto",
    ):
        super().__init__()
        self.metric, self.reduction, self.backend, self.form = metric, reduction, backend, form
        # a tuple of floats, not a buffer: module.to(bfloat16) must not round the weights
        self.weights = None if weights is None else _checks.weight_values(weights)

    def forward(self, targets: Sequence[Tensor], guides: Sequence[Tensor]) -> Tensor:
        return guidance_loss(
            targets,
            guides,
            metric=self.metric,
            weights=self.weights,
            reduction=self.reduction,
            backend=self.backend,
            form=self.form,
        )

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, reduction={self.reduction!r}, backend={self.backend!r}"
