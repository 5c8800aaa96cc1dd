"""guidance_kernels: fused kernels for representational-alignment guidance.

>>> import guidance_kernels as gk
>>> loss = task_loss + alpha * gk.guidance_loss(target_acts, guide_acts)  # doctest: +SKIP
"""

from guidance_kernels import ops  # registers the torch.library ops
from guidance_kernels.backends import list_backends, resolve_backend
from guidance_kernels.functional import (
    METRICS,
    centered_gram,
    choose_form,
    cka,
    cka_matrix,
    guidance_loss,
    pair_scores,
    procrustes,
)
from guidance_kernels.nn import GuidanceLoss

__version__ = "0.1.0"

__all__ = [
    "cka",
    "procrustes",
    "guidance_loss",
    "pair_scores",
    "GuidanceLoss",
    "centered_gram",
    "cka_matrix",
    "choose_form",
    "list_backends",
    "resolve_backend",
    "METRICS",
    "ops",
]
