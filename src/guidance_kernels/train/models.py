"""Built-in models for the digits experiments (8x8 grey images, 10 classes).

Importable by name through :func:`build_model` (the similarity CLI reuses them):

* ``deep_fcn`` — a deep plain fully connected net: ``depth`` Linear layers with ReLU between
  them, no normalization, no skip connections. ``init="kaiming"`` (default: He-normal weights,
  zero biases) keeps the forward signal's scale through depth; ``init="default"`` is PyTorch's
  Linear init, whose variance gain of 1/3 per layer (1/6 with ReLU) makes the input signal
  vanish under the biases by depth 40, so that every input gives the same output.
* ``small_cnn`` — a small CNN (two 3x3 convs, one hidden Linear): the guide.
* ``shallow_fcn`` — a 3-layer MLP, a sanity reference.

Every model takes images ``(n, 1, 8, 8)`` (or anything that flattens to 64 features for the
FCNs) and returns logits ``(n, 10)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


class DeepFCN(nn.Sequential):
    """``depth`` Linear layers (``depth - 1`` hidden of width ``width``), ReLU, nothing else."""

    def __init__(self, depth: int = 40, width: int = 64, in_features: int = 64,
                 num_classes: int = DIGITS_CLASSES, init: str = "kaiming"):
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        dims = [in_features] + [width] * (depth - 1) + [num_classes]
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        elif init != "default":
            raise ValueError(f"init must be 'kaiming' or 'default', got {init!r}")


class SmallCNN(nn.Module):
    """conv(1→16) → ReLU → conv(16→32) → ReLU → maxpool 2 → Linear(512→64) → ReLU → Linear(64→10)."""

    def __init__(self, channels: int = 16, hidden: int = 64, num_classes: int = DIGITS_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * channels * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *DIGITS_SHAPE)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def shallow_fcn(width: int = 128) -> nn.Module:
    return DeepFCN(depth=3, width=width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "deep_fcn": DeepFCN,
    "small_cnn": SmallCNN,
    "shallow_fcn": shallow_fcn,
}


def build_model(name: str, *, seed: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name; ``seed`` makes its initialisation reproducible."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if seed is None:
        return MODELS[name](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**kwargs)
