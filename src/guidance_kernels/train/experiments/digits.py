"""The earlier study (not run by default): a 40-layer plain ReLU FCN (He init) on scikit-learn's
8x8 digits, guided by a small 2-D CNN. Kept as ``--experiment digits``; a He-initialised FCN
trains fine here, so this task does not show what guidance is for."""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

from guidance_kernels.train.experiments.spec import ExperimentSpec, standard_claims

ARMS = ("alone", "guided_trained", "guided_untrained", "kd_trained", "kd_untrained",
        "warmup_trained", "warmup_untrained")


def spec() -> ExperimentSpec:
    return ExperimentSpec(
        name="digits", title="digits: 40-layer plain FCN guided by a small CNN", arms=ARMS,
        steps=300, guide_steps=300, batch_size=256, warmup_steps=50, first_k=100,
        eval_every=25, chance=0.1, sizes={"depth": 40, "width": 64},
        claims=standard_claims("trained"),
    )


@functools.lru_cache(maxsize=1)
def _data():
    from guidance_kernels.data import load_digits_tensors

    return load_digits_tensors()


def data(spec: ExperimentSpec, seed: int):
    return _data()


def build_target(spec: ExperimentSpec, seed: int) -> nn.Module:
    from guidance_kernels.train.models import build_model

    return build_model("deep_fcn", seed=seed, depth=spec.sizes["depth"], width=spec.sizes["width"])


def build_guide(spec: ExperimentSpec, seed: int) -> nn.Module:
    from guidance_kernels.train.models import build_model

    return build_model("small_cnn", seed=10_000 + seed)


def target_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]


def guide_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]


def task_loss(out, y):
    return F.cross_entropy(out, y.reshape(-1))
