"""Copy-paste: a tanh RNN target guided by a causal Transformer.

Data: :func:`guidance_kernels.data.copy_paste_tensors` (one-hot ``(n, 2L+1, symbols+2)``; labels
``(n, L)``). Both models read the whole sequence and return logits ``(n * L, symbols)`` for the
``L`` positions after the marker (so the task loss, KD and accuracy are per scored token).
Target: ``layers`` single-layer ``nn.RNN`` (tanh, ``hidden``) stacked, a Linear head; the RNN
outputs ``(n, T, hidden)`` are the guided layers. Guide: a Linear embedding plus learned
positions, ``layers`` pre-norm causal ``nn.TransformerEncoderLayer`` (``d``), a Linear head; the
encoder-layer outputs are the guiding layers. Activations are flattened per sample
``(n, T * hidden)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from guidance_kernels.train.experiments.spec import ExperimentSpec, standard_claims

ARMS = ("alone", "guided_trained", "guided_untrained", "kd_untrained", "warmup_untrained")


def spec() -> ExperimentSpec:
    return ExperimentSpec(
        name="copy_paste", title="Copy-paste: tanh RNN guided by a causal Transformer", arms=ARMS,
        steps=500, guide_steps=400, batch_size=64, warmup_steps=100, first_k=100,
        grad_clip=1.0, eval_every=50, chance=1 / 8,
        # the guide (a time saving, fixed before any guided arm ran with it): first of 100 / 200 /
        # 400 steps reaching 95 % on 1000 held-out training sequences (first run: 400 steps, 100 %)
        guide_val=1000, guide_checks=(100, 200, 400), guide_min_acc=0.95,
        sizes={"length": 16, "symbols": 8, "hidden": 128, "layers": 2, "d": 64, "heads": 4,
               "n_train": 20_000, "n_test": 1000},
        claims=standard_claims("untrained"),
    )


class RNNTarget(nn.Module):
    def __init__(self, d_in: int, hidden: int, layers: int, symbols: int, length: int):
        super().__init__()
        self.rnns = nn.ModuleList(
            nn.RNN(d_in if i == 0 else hidden, hidden, nonlinearity="tanh", batch_first=True)
            for i in range(layers))
        self.head = nn.Linear(hidden, symbols)
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for r in self.rnns:
            h = r(h)[0]
        return self.head(h[:, -self.length:]).reshape(-1, self.head.out_features)


class CausalTransformer(nn.Module):
    def __init__(self, d_in: int, d: int, layers: int, heads: int, symbols: int, length: int):
        super().__init__()
        T = 2 * length + 1
        self.embed = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, symbols)
        self.length = length
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        mask = self.mask[: x.shape[1], : x.shape[1]]
        for b in self.blocks:
            h = b(h, src_mask=mask, is_causal=True)
        return self.head(h[:, -self.length:]).reshape(-1, self.head.out_features)


@functools.lru_cache(maxsize=4)
def _data(n_train: int, n_test: int, length: int, symbols: int, seed: int):
    from guidance_kernels.data import copy_paste_tensors

    train = copy_paste_tensors(n_train, length, symbols, seed=2 * seed)
    test = copy_paste_tensors(n_test, length, symbols, seed=2 * seed + 1)
    return train, test


def data(spec: ExperimentSpec, seed: int):
    s = spec.sizes
    return _data(s["n_train"], s["n_test"], s["length"], s["symbols"], seed)


def build_target(spec: ExperimentSpec, seed: int) -> nn.Module:
    s = spec.sizes
    torch.manual_seed(seed)
    return RNNTarget(s["symbols"] + 2, s["hidden"], s["layers"], s["symbols"], s["length"])


def build_guide(spec: ExperimentSpec, seed: int) -> nn.Module:
    s = spec.sizes
    torch.manual_seed(10_000 + seed)
    return CausalTransformer(s["symbols"] + 2, s["d"], s["layers"], s["heads"], s["symbols"], s["length"])


def target_layers(model: nn.Module) -> list[str]:
    return [f"rnns.{i}" for i in range(len(model.rnns))]


def guide_layers(model: nn.Module) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y.reshape(-1))
