"""Guided training: hooks, layer mapping, the :class:`Guidance` loss, schedules, a small
trainer, distributed helpers, the digits models and the demo experiments.

Use :class:`Guidance` from your own loop::

    g = Guidance(target, guide, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear))
    with g.record():
        logits = target(x)
    loss = F.cross_entropy(logits, y) + g.loss(x, step=step)
"""

from guidance_kernels.train.guidance import KD, Guidance, kd_loss
from guidance_kernels.train.hooks import ActivationRecorder
from guidance_kernels.train.mapping import map_layers, select_layers
from guidance_kernels.train.models import MODELS, build_model
from guidance_kernels.train.schedules import (
    AlphaDecay,
    Continuous,
    FirstK,
    NoiseWarmup,
    Schedule,
)
from guidance_kernels.train.trainer import TrainConfig, Trainer

__all__ = [
    "ActivationRecorder",
    "AlphaDecay",
    "Continuous",
    "FirstK",
    "Guidance",
    "KD",
    "MODELS",
    "NoiseWarmup",
    "Schedule",
    "TrainConfig",
    "Trainer",
    "build_model",
    "kd_loss",
    "map_layers",
    "select_layers",
]
