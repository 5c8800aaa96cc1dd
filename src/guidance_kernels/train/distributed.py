"""Guided training under ``torch.distributed`` (launch with ``torchrun``).

DDP: wrap the target as usual; :class:`~guidance_kernels.train.guidance.Guidance` unwraps
``.module`` for layer names and its hooks sit on the inner modules, so they see every forward.
FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters, not activations: the hooks on
the sharded submodules see full per-sample activations of the local batch, so guidance works
unchanged (apply ``fully_shard`` to submodules first, then the root, as FSDP2 expects).
The guide is not trained: give every rank a full copy (no wrapper).

Two forms of the loss:

* ``gather="rank"`` (default): each rank computes the guidance loss on its own shard of ``b``
  samples; DDP averages the gradients. This is the mean of per-shard CKAs, **not** the CKA of
  the global batch (CKA is not additive over samples), but it costs nothing extra.
* ``gather="global"``: every guided activation (target and guide) is all-gathered so each rank
  computes the exact loss of the global batch of ``W*b`` samples. The target gather is
  differentiable (``torch.distributed.nn.functional.all_gather``: its backward sums the
  gradient of every rank's identical loss onto the owning rank, i.e. ``W * dL/dX_r``), and DDP's
  gradient averaging divides by ``W`` again, so the parameter gradient equals the single-process
  gradient of ``task_mean(global batch) + alpha * guidance(global batch)`` exactly (with
  equal shard sizes). Memory: each rank holds the gathered activations of all guided layers,
  ``W`` times the local guided activation memory for the target (kept for backward) plus ``W``
  times for the guide, and Grams of ``(W*b)^2`` instead of ``b^2``; the backward moves the same
  volume again (all-to-all on gloo, reduce-scatter on NCCL). Ranks may hold different local
  batch sizes (a short last batch without ``drop_last``): :func:`gather_batch` exchanges the row
  counts on the host (a gloo group, no device sync), pads and trims, and the guidance term stays
  the exact loss of the global batch, value and gradient. Only the task term then differs from
  one process: DDP averages per-rank means; weight each rank's task loss by ``W * n_r / sum(n)``
  if the global mean is wanted.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (no-op without it)."""
    if is_distributed():
        return world()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return world()


def shard(batch: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """This rank's contiguous slice of a global batch (the global size must divide evenly)."""
    if rank is None or world_size is None:
        rank, world_size = world()
    n = batch.shape[0]
    if n % world_size:
        raise ValueError(f"global batch of {n} does not split evenly over {world_size} ranks")
    b = n // world_size
    return batch[rank * b:(rank + 1) * b]


_SIZE_GROUPS: dict = {}
_MAX_DIMS = 8  # shapes exchanged before a gather are padded to this many dims


def _size_group(group):
    """A gloo group over the same ranks as ``group``, for exchanging host integers (row counts)
    without touching the device: no device sync. ``group`` itself when it already is gloo."""
    if dist.get_backend(group) == "gloo":
        return group
    key = id(group)
    if key not in _SIZE_GROUPS:  # created collectively: every rank reaches the first gather together
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _SIZE_GROUPS[key] = dist.new_group(ranks=ranks, backend="gloo")
    return _SIZE_GROUPS[key]


def gather_sizes(n: int | Sequence[int], *, group=None) -> list:
    """Every rank's ``n`` (host integers; an int or a list of equal length on every rank), in rank
    order; exchanged over gloo on the host, in one collective."""
    ws = dist.get_world_size(group)
    local = torch.tensor([n] if isinstance(n, int) else list(n), dtype=torch.int64)
    parts = [torch.empty_like(local) for _ in range(ws)]
    dist.all_gather(parts, local, group=_size_group(group))
    return [int(p[0]) for p in parts] if isinstance(n, int) else [p.tolist() for p in parts]


def _all_gather(t: Tensor, group, differentiable: bool) -> list[Tensor]:
    if differentiable:
        # Deprecated in favour of _functional_collectives, whose autograd backward needs a
        # reduce-scatter that gloo lacks; this one falls back to all-to-all on gloo.
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return list(all_gather(t.contiguous(), group=group))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def gather_batch(tensors: Sequence[Tensor], *, group=None, differentiable: bool) -> list[Tensor]:
    """Concatenate each tensor ``(n_r, ...)`` over ranks along dim 0 (rank order): ``(sum n_r, ...)``.
    Identity without a group.

    Ranks may hold different row counts (a short last batch): the counts are exchanged first
    (host integers over gloo, no device sync), shorter tensors are zero-padded to the largest,
    gathered, and each rank's padding is cut off again, so the result is exactly the
    concatenation. ``differentiable=True`` uses the autograd-aware all-gather (gradients flow
    back to the owning rank's rows; padding rows get none); ``False`` a plain all-gather."""
    if not is_distributed() or not tensors:
        return list(tensors)
    # every tensor's shape, padded to _MAX_DIMS with -1, from every rank: one host collective
    if any(t.dim() > _MAX_DIMS or t.dim() == 0 for t in tensors):
        raise ValueError(f"gather_batch: tensors need 1 to {_MAX_DIMS} dims, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    local = [d for t in tensors for d in (*t.shape, *([-1] * (_MAX_DIMS - t.dim())))]
    shapes = [[r[i * _MAX_DIMS:(i + 1) * _MAX_DIMS] for i in range(len(tensors))]
              for r in gather_sizes(local, group=group)]  # [rank][tensor] -> padded shape
    out = []
    for i, t in enumerate(tensors):
        tails = {tuple(r[i][1:]) for r in shapes}
        if len(tails) != 1:
            raise ValueError(f"gather_batch: tensor {i} has per-sample shapes that differ across ranks "
                             f"({[tuple(d for d in r[i] if d >= 0) for r in shapes]}); only the batch "
                             f"dimension (dim 0) may differ")
        sizes = [r[i][0] for r in shapes]
        n, top = t.shape[0], max(sizes)
        if top > n:
            t = torch.cat([t, t.new_zeros((top - n, *t.shape[1:]))])
        parts = _all_gather(t, group, differentiable)
        if top == min(sizes):
            out.append(torch.cat(parts, dim=0))
        else:
            out.append(torch.cat([p[:k] for p, k in zip(parts, sizes)], dim=0))
    return out


def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel`` for CPU (gloo) or the current CUDA device."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        kwargs.setdefault("device_ids", [torch.cuda.current_device()])
    return DDP(model, **kwargs)


def wrap_fsdp(model: nn.Module, layer_types: tuple[type, ...] = (nn.Linear, nn.Conv2d), **kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` every module of ``layer_types`` that owns parameters, then the root.
    Module names (and so the guided layer names) are unchanged."""
    from torch.distributed.fsdp import fully_shard

    for m in list(model.modules()):
        if m is not model and isinstance(m, layer_types) and any(True for _ in m.parameters(recurse=False)):
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model
