"""Our all-pairs minibatch CKA map next to the PyPI peers on the same activations.

Peers (optional; each row says why one is absent):

* ``pytorch-cka`` (import ``cka``): model-level ``compute_cka`` with forward hooks; unbiased HSIC
  accumulated over batches (the Nguyen et al. minibatch CKA) in the activations' dtype (fp32 here),
  from raw uncentered Grams (``tr(K L)`` minus correction terms); the final ratio is clamped to
  ``[0, 1]`` (a negative unbiased estimate reads as 0).
* ``torch-cka`` (import ``torch_cka``): model-level ``CKA.compare``; the same estimator, fp32, one
  ``K @ L`` product (``n³``) and three ``.item()`` host syncs per layer pair per batch.
* ``ckatorch``: its model-level ``CKA.__call__`` **assigns** ``cka_epoch[i, j] = cka_batch(x, y)``
  inside the batch loop (an overwritten accumulator: only the last batch counts), and its
  ``cka_batch`` expects ``(batches, n, features)``, so 2-D layer outputs do not go through it at
  all. We call its function ``ckatorch.cka_batch`` per layer pair on the activations stacked as
  ``(batches, n, p)``, which is the same minibatch estimator in fp64 (equal batch sizes only).

All peers receive the same activations through "replay" models (identity layers that emit
stored activations for a batch of sample indices), so every number compares the estimators, and
the times include each peer's hook/loop machinery but no real network forward. The reference is
an independent fp64 implementation of the same estimator (Song et al.'s formula, not
U-centering): ``guidance_kernels.truth.minibatch_cka``. Each peer's adapter lives in
``guidance_kernels/peer_adapters.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from guidance_kernels.peer_adapters import PEERS as _ADAPTERS
from guidance_kernels.peer_adapters import Replay
from guidance_kernels.truth import minibatch_cka as fp64_minibatch_cka

__all__ = ["Replay", "fp64_minibatch_cka", "run_ours", "PEERS", "compare"]


def run_ours(acts_a, acts_b, batch_size: int, symmetric: bool = False) -> Tensor:
    from guidance_kernels.similarity.capture import layer_cka

    N = acts_a[0].shape[0]
    ra = Replay(acts_a)
    rb = ra if symmetric else Replay(acts_b)
    res = layer_cka(ra, None if symmetric else rb, torch.arange(N), layers_a=ra.names,
                    layers_b=rb.names, batch_size=batch_size, ragged="drop")
    return res.matrix


run_pytorch_cka = _ADAPTERS["pytorch-cka"].minibatch_map
run_torch_cka = _ADAPTERS["torch-cka"].minibatch_map
run_ckatorch = _ADAPTERS["ckatorch"].minibatch_map

# name -> (module to import, function (acts_a, acts_b, batch_size, symmetric) -> map)
PEERS: dict[str, tuple[str, Callable]] = {
    "ours": ("guidance_kernels", run_ours),
    **{name: (_ADAPTERS[name].module, _ADAPTERS[name].minibatch_map)
       for name in ("pytorch-cka", "torch-cka", "ckatorch")},
}


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {"ours": "guidance_kernels", "pytorch-cka": "pytorch-cka", "torch-cka": "torch-cka",
             "ckatorch": "ckatorch"}
    try:
        return version(names.get(dist, dist))
    except PackageNotFoundError:
        return None


def compare(acts_a, acts_b, batch_size: int, *, symmetric: bool = False, repeats: int = 3,
            peers: Sequence[str] = tuple(PEERS), slow_limit_s: float = 60.0) -> dict:
    """Run every available peer; max |difference| to ours and to the fp64 reference, time
    (best of ``repeats``; one run when a run takes more than ``slow_limit_s``), diagonal and
    symmetry when A is B."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    if symmetric:
        acts_b = acts_a
    truth = fp64_minibatch_cka(acts_a, acts_b, batch_size)
    results, mats = {}, {}
    for name in peers:
        module, fn = PEERS[name]
        row: dict = {"package": name, "version": _version(name)}
        try:
            __import__(module)
        except Exception as e:  # absent or broken peer
            row["status"] = f"not available: {type(e).__name__}: {e}"
            results[name] = row
            continue
        times = []
        m = None
        try:
            for r in range(repeats):
                t0 = time.perf_counter()
                m = fn(acts_a, acts_b, batch_size, symmetric)
                times.append(time.perf_counter() - t0)
                if times[-1] > slow_limit_s:
                    break
        except Exception as e:
            row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            results[name] = row
            continue
        m = m.double().cpu()
        mats[name] = m
        row.update({
            "status": "ok", "seconds_best": min(times), "seconds_all": times,
            "max_abs_diff_vs_fp64": float((m - truth).abs().max()),
            "finite": bool(torch.isfinite(m).all()),
            "min_value": float(m.min()),
        })
        if symmetric:
            row["max_abs_asymmetry"] = float((m - m.T).abs().max())
            row["max_abs_diag_minus_1"] = float((m.diagonal() - 1).abs().max())
        results[name] = row
    if "ours" in mats:
        for name, m in mats.items():
            d = (m - mats["ours"]).abs()
            results[name]["max_abs_diff_vs_ours"] = float(d.max())
            # where the unbiased estimate is negative, clamping peers read 0
            neg = truth < 0
            if neg.any():
                results[name]["max_abs_diff_vs_ours_where_fp64_ge_0"] = float(d[~neg].max())
    return {"reference_min": float(truth.min()), "negative_cells_in_reference": int((truth < 0).sum()),
            "peers": results}


def small_batch_behaviour(n: int = 3) -> dict:
    """What each peer does with a batch of ``n < 4`` samples (ours raises a clear error)."""
    g = torch.Generator().manual_seed(0)
    a, b = [torch.randn(2 * n, 8, generator=g)], [torch.randn(2 * n, 5, generator=g)]
    out = {}
    for name, (module, fn) in PEERS.items():
        try:
            __import__(module)
        except Exception:
            out[name] = "not available"
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                m = fn(a, b, n, False)
            out[name] = f"returned {m.flatten().tolist()} (finite: {bool(torch.isfinite(m).all())})"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:160]}"
    return out
