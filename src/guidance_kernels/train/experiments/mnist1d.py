"""MNIST-1D: a deep MLP target guided by a small 1-D CNN.

Target: ``depth`` x [Linear(width) + BatchNorm1d + ReLU] and a Linear head; its hidden Linear
outputs (pre-BN) are the guided layers. Guide: ``convs`` x [Conv1d(channels, k=5) + ReLU],
max-pool 2 after the first two, global average pool, Linear head; its Conv1d outputs are the
guiding layers (paired to the target's by even spread over depth). Inputs ``(n, 40)`` float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from guidance_kernels.train.experiments.spec import ExperimentSpec, standard_claims

ARMS = ("alone", "guided_trained", "guided_untrained", "kd_trained", "kd_untrained",
        "warmup_trained", "firstk_trained")


def spec() -> ExperimentSpec:
    return ExperimentSpec(
        name="mnist1d", title="MNIST-1D: deep MLP guided by a 1-D CNN", arms=ARMS,
        steps=300, guide_steps=2000, batch_size=256, warmup_steps=150, first_k=100,
        eval_every=25, chance=0.1,
        # the guide: the MNIST-1D reference CNN's learning rate (1e-2); trained on 3500 of the
        # 4000 training signals until it reaches 85 % on the other 500 (checked at these steps)
        guide_lr=1e-2, guide_val=500, guide_checks=(250, 500, 1000, 2000), guide_min_acc=0.85,
        sizes={"depth": 8, "width": 256, "convs": 4, "channels": 32},
        claims=standard_claims("trained"),
    )


class MLP(nn.Sequential):
    def __init__(self, depth: int, width: int, d_in: int = 40, classes: int = 10):
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)


class CNN1d(nn.Module):
    def __init__(self, convs: int, channels: int, classes: int = 10):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(1 if i == 0 else channels, channels, 5, padding=2) for i in range(convs))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, -1)
        for i, c in enumerate(self.convs):
            h = torch.relu(c(h))
            if i < 2:
                h = F.max_pool1d(h, 2)
        return self.head(h.mean(-1))


@functools.lru_cache(maxsize=2)
def load(seed: int = 42):
    """The published MNIST-1D recipe (data seed 42, 4000 / 1000), the same for every run seed."""
    from guidance_kernels.data import mnist1d_tensors

    return mnist1d_tensors(seed=seed)


def data(spec: ExperimentSpec, seed: int):
    return load(spec.sizes.get("data_seed", 42))


def build_target(spec: ExperimentSpec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(spec.sizes["depth"], spec.sizes["width"])


def build_guide(spec: ExperimentSpec, seed: int) -> nn.Module:
    torch.manual_seed(10_000 + seed)
    return CNN1d(spec.sizes["convs"], spec.sizes["channels"])


def target_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]


def guide_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d)]


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y.reshape(-1))
