"""Launched by tests/test_train_distributed.py with torchrun (2 CPU ranks, gloo).

Writes ``rank{r}.pt`` into the folder given as argv[1] with, per case, the loss on this rank and
the parameter gradients after backward (DDP-averaged)."""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from guidance_kernels.train import Guidance, TrainConfig, Trainer
from guidance_kernels.train.distributed import init_from_env, shard, wrap_ddp, wrap_fsdp
from guidance_kernels.train.models import DeepFCN, SmallCNN


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def make():
    torch.manual_seed(0)
    return DeepFCN(depth=6, width=16), SmallCNN(channels=4, hidden=8)


def step(model, guide, x, y, gather):
    G = Guidance(model, guide, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear), gather=gather)
    with G.record():
        out = model(x)
    gl = G.loss(x)
    (F.cross_entropy(out, y) + gl).backward()
    G.close()
    return gl.detach()


def main(out):
    torch.set_num_threads(1)
    rank, ws = init_from_env("gloo")
    X, Y = data()
    x, y = shard(X), shard(Y)
    res = {}
    for gather in ("rank", "global"):
        t, g = make()
        ddp = wrap_ddp(t)
        res[gather] = step(ddp, g, x, y, gather)
        res[gather + "_grads"] = [p.grad.clone() for p in t.parameters()]
    t, g = make()
    fs = wrap_fsdp(t)
    res["fsdp_rank"] = step(fs, g, x, y, "rank")
    t, g = make()
    fs = wrap_fsdp(t)
    res["fsdp_global"] = step(fs, g, x, y, "global")
    # the trainer under DDP with the exact global loss: same parameters as one process
    t, g = make()
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear), gather="global")
    ddp = wrap_ddp(t)
    cfg = TrainConfig(steps=3, batch_size=16, progress=False, eval_every=0, lr=1e-2)
    # SGD, not Adam: Adam's normalisation turns rounding noise in ~0 gradients into lr-sized steps
    Trainer(ddp, (X, Y), cfg, guidance=G, optimizer=torch.optim.SGD(t.parameters(), lr=0.1)).fit()
    res["trainer_params"] = [p.detach().clone() for p in t.parameters()]
    torch.save(res, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
