"""gather="global" with unequal per-rank batches (8 vs 7 rows, a short last batch without
drop_last) on 2 gloo ranks (torch.multiprocessing spawn): the guidance loss and its parameter
gradient equal one process on the 15-row global batch. fp64 models, so the only differences are
summation orders in fp64."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerance import assert_within
from torch import nn

from guidance_kernels.train import Guidance
from guidance_kernels.train.distributed import gather_batch, gather_sizes, wrap_ddp
from guidance_kernels.train.models import DeepFCN, SmallCNN

SPLIT = (8, 7)  # rows on rank 0, rank 1
# fp64 sums over the largest layers (64 inputs, 4 x 8 x 8 conv features) and 15² Gram terms
TOL = dict(dtype=torch.float64, k=64 + 4 * 8 * 8 + 15 * 15, c=16)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(SPLIT), 1, 8, 8, generator=g, dtype=torch.float64)


def make():
    torch.manual_seed(0)
    return DeepFCN(depth=4, width=16).double(), SmallCNN(channels=4, hidden=8).double()


def guidance_step(model, guide, x, gather):
    """Guidance loss alone (no task term), backward; returns the detached loss."""
    G = Guidance(model, guide, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear),
                 gather=gather)
    with G.record():
        model(x)
    loss = G.loss(x)
    loss.backward()
    G.close()
    return loss.detach()


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        X = data()
        lo = sum(SPLIT[:rank])
        x = X[lo:lo + SPLIT[rank]]
        res = {"sizes": gather_sizes(x.shape[0])}
        # gather_batch alone: the exact concatenation, gradients back to the owner's rows only
        leaf = x.reshape(x.shape[0], -1).clone().requires_grad_()
        (full,) = gather_batch([leaf], differentiable=True)
        res["gathered"] = full.detach()
        (full * torch.arange(1.0, full.shape[0] + 1, dtype=full.dtype)[:, None]).sum().backward()
        res["leaf_grad"] = leaf.grad
        # per-sample shapes that differ across ranks: a clear error on every rank, no crash
        try:
            gather_batch([torch.zeros(3, 4 + rank)], differentiable=False)
            res["shape_error"] = None
        except ValueError as e:
            res["shape_error"] = str(e)
        # the guidance loss under DDP with the exact global loss
        t, g = make()
        res["loss"] = guidance_step(wrap_ddp(t), g, x, "global")
        res["grads"] = [p.grad.clone() for p in t.parameters()]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("unequal")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_sizes_and_gathered_rows_are_exact(ranks):
    X = data().reshape(sum(SPLIT), -1)
    for r, res in enumerate(ranks):
        assert res["sizes"] == list(SPLIT)
        assert res["gathered"].shape == X.shape and torch.equal(res["gathered"], X)
        # every rank's identical loss sum_i i * row_i: the owner gets W copies of its rows' weights
        lo = sum(SPLIT[:r])
        want = 2 * torch.arange(lo + 1.0, lo + SPLIT[r] + 1, dtype=X.dtype)[:, None].expand(-1, X.shape[1])
        assert torch.equal(res["leaf_grad"], want)


def test_per_sample_shapes_differing_across_ranks_is_a_clear_error(ranks):
    for res in ranks:
        assert res["shape_error"] is not None and "differ across ranks" in res["shape_error"]
        assert "(3, 4)" in res["shape_error"] and "(3, 5)" in res["shape_error"]


def test_global_loss_and_grads_with_unequal_batches_equal_one_process(ranks):
    t, g = make()
    want = guidance_step(t, g, data(), "rank")  # one process: the whole 15-row batch
    grads = [p.grad for p in t.parameters()]
    # CKA is shift-invariant, so the biases' gradients are 0 up to rounding: judge every entry
    # against the largest gradient entry (the size of the terms summed into any of them)
    scale = max(float(gr.abs().max()) for gr in grads)
    for res in ranks:
        assert_within(res["loss"], want, **TOL)
        for a, b in zip(res["grads"], grads):
            assert_within(a, b, scale=scale, **TOL)
    # the comparison can fail: the loss on rank 0's 8 rows alone differs
    t8, g8 = make()
    assert abs(float(guidance_step(t8, g8, data()[:8], "rank")) - float(want)) > 1e-3
