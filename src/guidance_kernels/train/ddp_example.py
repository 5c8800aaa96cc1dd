"""Guided training of the digits FCN under DDP:

    torchrun --nproc_per_node 2 -m guidance_kernels.train.ddp_example [--global-loss] [--fsdp]

Each rank takes its slice of every global batch of 256; ``--global-loss`` computes the exact
guidance loss over the global batch (all-gathered activations), otherwise per rank; ``--fsdp``
shards the target with FSDP2 ``fully_shard`` instead of DDP. Rank 0 prints the test accuracy.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from guidance_kernels.train import Guidance, TrainConfig, Trainer
from guidance_kernels.data import load_digits_tensors
from guidance_kernels.train.distributed import init_from_env, wrap_ddp, wrap_fsdp
from guidance_kernels.train.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--global-loss", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world_size = init_from_env()
    train, test = load_digits_tensors()
    guide = build_model("small_cnn", seed=0)
    # the guide: a short training of the small CNN from seed 0 (same data and order on every rank)
    Trainer(guide, train, TrainConfig(steps=300, batch_size=256, progress=False, eval_every=0),
            name="guide").fit()
    target = build_model("deep_fcn", seed=0)
    g = Guidance(target, guide, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear),
                 gather="global" if args.global_loss else "rank")
    model = wrap_fsdp(target) if args.fsdp else wrap_ddp(target)
    cfg = TrainConfig(steps=args.steps, batch_size=256, progress=rank == 0, eval_every=50)
    hist = Trainer(model, train, cfg, guidance=g, eval_data=test, name=f"rank{rank}").fit()
    if rank == 0:
        print(f"world {world_size}: test accuracy {hist.eval[-1]['acc']:.3f}")
    g.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
