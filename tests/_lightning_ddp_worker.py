"""Run by test_integration_lightning: 2-process CPU DDP (gloo) fit of the guided Classifier with
gather='global'; each rank writes rank{r}.json in the output folder (argv[1]). Lightning's "ddp"
strategy launches rank 1 by re-running this script."""

import copy
import json
import pathlib
import sys

import lightning as L
import torch
from lightning_models import Classifier, data, loader, make_guide

import guidance_kernels as gk


class Recording(Classifier):
    def on_train_start(self):
        self.step_losses = []

    def guidance_loss(self, guide_x, **kw):
        loss = super().guidance_loss(guide_x, **kw)
        self.step_losses.append(float(loss.detach()))
        return loss


def single_process_step0(net, guide):
    """The guidance loss over the whole first global batch (16 samples) in one process."""
    x, _ = data()
    with torch.no_grad():
        h0, h3 = net[0](x), net(x)
        guide.eval()
        g0, g4 = guide[0](x), guide(x)
    return float(gk.guidance_loss([h0, h3], [g0, g4]))


def main(out: pathlib.Path):
    guide = make_guide()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    model = Recording(guide, gather="global")
    net0 = copy.deepcopy(model.net)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(out), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
    )
    # 16 samples: DistributedSampler gives each rank 8 per epoch, batch 8 -> one step per epoch
    trainer.fit(model, loader(n=16, batch=8))
    rank = trainer.global_rank
    after = guide.state_dict()
    result = {
        "rank": rank,
        "logged": sorted(trainer.callback_metrics),
        "step0_guidance_loss": model.step_losses[0],
        "single_process_step0": single_process_step0(net0, make_guide()),
        "guide_unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "no_guide_grads": all(p.grad is None for p in guide.parameters()),
        "params": [p.detach().double().sum().item() for p in model.net.parameters()],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
