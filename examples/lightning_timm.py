"""A LightningModule classifier guided by a timm network (built from its config, no download).

    python examples/lightning_timm.py --steps 50
    python examples/lightning_timm.py --steps 5 --batch 8 --devices 2 --strategy ddp   # 2 CPU processes

The guidance lines are marked ``# +``. Here the guide is an untrained ResNet-18 (so the example
runs offline); in practice load trained weights (``pretrained=True`` or ``load_state_dict``).
The data are synthetic 32x32 images whose class shifts a colour channel.
"""

from __future__ import annotations

import argparse

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import nn

from guidance_kernels.integrations.lightning import GuidanceMixin  # +
from guidance_kernels.train import FirstK


class Classifier(GuidanceMixin, L.LightningModule):  # + (the mixin)
    def __init__(self, guide: nn.Module, classes: int = 4, lr: float = 0.05, k: int = 300, gather: str = "rank"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, classes),
        )
        self.lr = lr
        # +: the three convs of the target against ResNet-18's stages (even spread by depth)
        self.configure_guidance(guide, target="net", target_layers=nn.Conv2d,
                                guide_layers="layer*", alpha=FirstK(k), gather=gather)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with self.guidance_recording():  # +
            logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss + self.guidance_loss(x)  # +

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic(n: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y % 3] += (1 + y // 3).float().view(-1, 1, 1)
    return torch.utils.data.TensorDataset(x, y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--out", default="lightning_timm_out")
    a = p.parse_args(argv)
    L.seed_everything(0, verbose=False)
    guide = timm.create_model("resnet18", pretrained=False, num_classes=4)  # from config, no download
    model = Classifier(guide, gather="global" if a.devices > 1 else "rank")
    data = torch.utils.data.DataLoader(synthetic(a.batch * max(a.steps, 1), 4), batch_size=a.batch, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=a.strategy, max_steps=a.steps,
                        log_every_n_steps=1, default_root_dir=a.out, enable_progress_bar=False,
                        enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(a.out))
    trainer.fit(model, data)
    if trainer.is_global_zero:
        logged = {k: round(float(v), 4) for k, v in trainer.logged_metrics.items()}
        print("pairs:", model.guidance.pairs)
        print("last logged:", logged)


if __name__ == "__main__":
    main()
