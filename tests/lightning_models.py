"""A tiny guided LightningModule shared by the Lightning tests and their DDP worker."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from guidance_kernels.integrations.lightning import GuidanceMixin


def make_target(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def make_guide(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))


def data(n=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def loader(n=16, batch=8):
    x, y = data(n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


class Classifier(GuidanceMixin, L.LightningModule):
    def __init__(self, guide, lr=0.1, **guidance):
        super().__init__()
        self.net = make_target()
        self.lr = lr
        self.configure_guidance(guide, target="net", target_layers=["0", "3"],
                                guide_layers=["0", "4"], **guidance)
        self.seen = []  # (global_step, alpha) per training step
        self.grads = []  # parameter gradients after each backward

    def training_step(self, batch, batch_idx):
        x, y = batch
        with self.guidance_recording():
            logits = self.net(x)
        self.seen.append((self.guidance_step, self.guidance_alpha))
        return F.cross_entropy(logits, y) + self.guidance_loss(x)

    def on_after_backward(self):
        self.grads.append([p.grad.detach().clone() for p in self.net.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
