"""What the trainer integrations share: freezing the guide, moving it to the target's device,
and naming the logged per-pair values."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from guidance_kernels.train.guidance import Guidance

SIMILARITY_METRICS = ("cka", "debiased_cka")


def freeze(guide: nn.Module) -> nn.Module:
    """No gradients, eval mode (BatchNorm statistics and dropout frozen); returns ``guide``."""
    guide.requires_grad_(False)
    guide.eval()
    return guide


def follow_device(guide: nn.Module, device: torch.device) -> None:
    """Move ``guide`` to ``device`` if its parameters (or buffers) live elsewhere. Reads tensor
    metadata only (no host sync); a parameterless guide is left alone."""
    for t in guide.parameters():
        break
    else:
        t = next(iter(guide.buffers()), None)
    if t is not None and t.device != torch.device(device):
        guide.to(device)


def pair_keys(g: Guidance, prefix: str) -> list[str]:
    """One log key per layer pair: ``{prefix}/{metric}/{target}~{guide}``."""
    name = "cka" if g.metric in SIMILARITY_METRICS else g.metric
    return [f"{prefix}/{name}/{t}~{gl}" for t, gl in g.pairs]


def pair_values(g: Guidance, terms: Tensor) -> Tensor:
    """Per-pair values to log from the weighted terms ``(L,)``: the CKA itself for the CKA
    metrics (``1 - term / w``; weight-0 pairs give NaN), the distance for Procrustes."""
    terms = terms.detach().float()
    if g.weights is not None:
        w = torch.tensor(g.weights, dtype=terms.dtype, device=terms.device)
        terms = terms / w
    return 1 - terms if g.metric in SIMILARITY_METRICS else terms
