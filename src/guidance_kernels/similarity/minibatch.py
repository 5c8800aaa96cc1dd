"""Minibatch CKA over a dataset (Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn
the same things?"), for every layer of model A against every layer of model B.

Estimator. For each batch ``b`` of ``n_b >= 4`` samples and each layer ``l``, the raw Gram
``K_l = X_l X_lᵀ`` is U-centered (:func:`guidance_kernels.metrics.u_center_gram`), and the
unbiased HSIC of Song et al. (2012) of every pair is ``<U(K_i), U(L_j)> / (n_b (n_b - 3))``.
These are **summed over batches** (``hsic[i, j]``, ``self_a[i]``, ``self_b[j]``) and

    CKA[i, j] = hsic[i, j] / sqrt(self_a[i] * self_b[j]).

Each per-batch term is an unbiased estimate of the population HSIC, so the expectation of the
sums does not depend on the batch size; biased per-batch CKA, averaged, does (it shrinks towards a
batch-size dependent value). The *value* still depends on how samples are partitioned: a
different partition gives a different (equally unbiased) estimate, within sampling noise, and a
single batch of all samples gives the full-dataset unbiased CKA exactly. Reordering the batches,
or the samples inside a batch, changes the value only by rounding.

Cost and memory. Per batch: one ``ops.gram`` call for all layers of both models (each Gram once, stacked),
U-centering of the stacked ``(L, n, n)`` Grams, and one matrix product ``U_A U_Bᵀ`` of the
flattened stacks for all ``L_A x L_B`` pairs (``U Uᵀ`` when A is B). Memory: ``O(L n²)`` for the
batch plus the ``L_A x L_B`` fp64 accumulators, independent of dataset size. Nothing syncs with
the host (no ``.item()``); everything runs under ``no_grad``.

Row shifts. ``ops.gram`` may return the Gram of a row-shifted activation ``X - 1 c`` (the backend
contract allows a shift by the batch's first row for accuracy): U-centering removes any such
shift exactly (it annihilates ``a 1ᵀ + 1 bᵀ`` off the diagonal), so the estimator is unchanged.

Numerics. Grams accumulate in fp32 (fp64 for fp64 activations; bf16/fp16 activations are fine).
The ``n x n`` math after the Gram and the accumulators use ``center_dtype`` (fp64 by default: it
is ``O(L n²)``, negligible next to the Grams, and U-centering a Gram with a large common offset,
e.g. ReLU outputs, cancels digits). Every layer's Grams are multiplied by one constant per layer,
fixed at the first batch (``1 / mean diag``), which keeps the sums in range without changing the
estimator (CKA is invariant to a per-layer scale, and the constant is the same for all batches).

Degenerate layers (constant / dead / all-zero activations: summed self-HSIC at or below
``(64 eps_fp32)²`` times the summed squared off-diagonal Gram) get CKA 0 with every layer, as in
:mod:`guidance_kernels.metrics`. When A is B the matrix is exactly symmetric, and its diagonal is
exactly 1 for every non-degenerate layer (``x / sqrt(x * x) == 1`` in IEEE arithmetic).

Ragged last batch. Every batch needs ``n >= 4`` (the unbiased estimator divides by
``n (n - 3)``); a smaller batch raises ``ValueError``. A last batch with ``n >= 4`` samples can be
included with its own ``n`` (an unbiased term like the others, but noisier: every batch has the
same weight), or dropped; :func:`guidance_kernels.similarity.capture.layer_cka` drops by default
only a last batch with fewer than 4 samples (``ragged="auto"``).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from guidance_kernels import _checks, metrics
from guidance_kernels.backends import resolve_backend
from guidance_kernels.functional import stacked_grams
from guidance_kernels.planning import no_autocast

MIN_BATCH = 4

__all__ = ["MinibatchCKA", "minibatch_cka", "MIN_BATCH"]


def _check_batch(xs, name: str) -> list[Tensor]:
    xs = _checks._as_list(xs, name)
    if xs and isinstance(xs[0], Tensor) and xs[0].dim() >= 1 and xs[0].shape[0] < MIN_BATCH:
        raise ValueError(
            f"{name}: a batch of n = {xs[0].shape[0]} samples; the unbiased (minibatch) CKA needs "
            f"n >= {MIN_BATCH} per batch (it divides by n (n - 3)). Drop a short last batch "
            f"(DataLoader(drop_last=True), or layer_cka(ragged='drop')) or merge it into the "
            f"previous one."
        )
    return _checks.check_list(xs, name, min_n=MIN_BATCH)


class MinibatchCKA:
    """Accumulates unbiased HSIC over batches; :meth:`compute` gives the ``(L_A, L_B)`` CKA map.

    Args:
        num_a: number of layers of model A (rows).
        num_b: number of layers of model B (columns); ``None`` compares A with itself: call
            :meth:`update` with ``ys=None`` and the result is exactly symmetric.
        center_dtype: dtype of the ``n x n`` math and of the accumulators (default fp64).
        backend: backend for the Gram op (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).

    ``update(xs, ys)`` takes one batch: ``xs`` the activations ``(n, ...)`` of A's layers,
    ``ys`` those of B's layers, same ``n`` and device. Any float dtype.
    """

    def __init__(self, num_a: int, num_b: Optional[int] = None, *,
                 center_dtype: torch.dtype = torch.float64, backend: str = "auto"):
        if num_a < 1 or (num_b is not None and num_b < 1):
            raise ValueError(f"need at least one layer per model, got {num_a} and {num_b}")
        self.num_a, self.num_b = num_a, num_b
        self.symmetric = num_b is None
        self.center_dtype = center_dtype
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self.hsic: Optional[Tensor] = None     # (L_A, L_B) or (L, L): summed <U(K), U(L)>/(n(n-3))
        self.self_a: Optional[Tensor] = None   # (L_A,) summed self-HSIC
        self.self_b: Optional[Tensor] = None   # (L_B,)
        self.ref_a: Optional[Tensor] = None    # (L_A,) summed ||K~||² / (n(n-3)) (degeneracy scale)
        self.ref_b: Optional[Tensor] = None
        self.scale: Optional[Tensor] = None    # (L,) per-layer constant fixed at the first batch
        self.batches = 0
        self.samples = 0

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def update(self, xs: Sequence[Tensor], ys: Optional[Sequence[Tensor]] = None) -> None:
        xs2 = _check_batch(xs, "xs")
        if len(xs2) != self.num_a:
            raise ValueError(f"xs has {len(xs2)} layers, expected {self.num_a}")
        if self.symmetric:
            if ys is not None:
                raise ValueError("this accumulator compares A with itself (num_b=None): pass ys=None")
            layers = xs2
        else:
            if ys is None:
                raise ValueError("ys is required (num_b was given); use num_b=None for A against itself")
            ys2 = _check_batch(ys, "ys")
            if len(ys2) != self.num_b:
                raise ValueError(f"ys has {len(ys2)} layers, expected {self.num_b}")
            if ys2[0].shape[0] != xs2[0].shape[0]:
                raise ValueError(f"xs have n = {xs2[0].shape[0]} samples but ys have n = {ys2[0].shape[0]}")
            if ys2[0].device != xs2[0].device:
                raise ValueError(f"xs are on {xs2[0].device} but ys are on {ys2[0].device}")
            layers = xs2 + ys2
        n = xs2[0].shape[0]
        dtype = self.center_dtype
        with no_autocast(xs2[0].device):
            k = stacked_grams(layers, resolve_backend(self.backend, layers)).to(dtype)  # (L, n, n)
            if self.scale is None:
                self.scale = _first_scale(k)
            k = k * self.scale[:, None, None]
            u = metrics.u_center_gram(k).flatten(1)                  # (L, n*n)
            denom = n * (n - 3)
            diag = k.diagonal(dim1=-2, dim2=-1)
            ref = ((k * k).sum((-2, -1)) - (diag * diag).sum(-1)) / denom   # ||K~||² / (n(n-3))
            selfs = (u * u).sum(-1) / denom                          # (L,)
            if self.symmetric:
                h = (u @ u.T) / denom
                sa, sb, ra, rb = selfs, None, ref, None
            else:
                la = self.num_a
                h = (u[:la] @ u[la:].T) / denom
                sa, sb, ra, rb = selfs[:la], selfs[la:], ref[:la], ref[la:]
        if self.hsic is None:
            self.hsic, self.self_a, self.ref_a = h, sa, ra
            self.self_b, self.ref_b = sb, rb
        else:
            self.hsic = self.hsic + h
            self.self_a = self.self_a + sa
            self.ref_a = self.ref_a + ra
            if not self.symmetric:
                self.self_b = self.self_b + sb
                self.ref_b = self.ref_b + rb
        self.batches += 1
        self.samples += n

    # ------------------------------------------------------------------ result
    @torch.no_grad()
    def compute(self) -> Tensor:
        """The ``(L_A, L_B)`` CKA matrix (``center_dtype``), on the activations' device."""
        if self.hsic is None:
            raise RuntimeError("no batch has been accumulated yet: call update() first")
        tol2 = metrics.tolerance(torch.float32) ** 2
        if self.symmetric:
            h = (self.hsic + self.hsic.T) / 2                        # exactly symmetric
            d = h.diagonal().clone()
            ok_a = ok_b = d > tol2 * self.ref_a
            da = db = torch.where(ok_a, d, torch.ones_like(d))
        else:
            h = self.hsic
            ok_a = self.self_a > tol2 * self.ref_a
            ok_b = self.self_b > tol2 * self.ref_b
            da = torch.where(ok_a, self.self_a, torch.ones_like(self.self_a))
            db = torch.where(ok_b, self.self_b, torch.ones_like(self.self_b))
        den = torch.sqrt(da[:, None] * db[None, :])                  # sqrt(x*x) == x: diag is 1
        ok = ok_a[:, None] & ok_b[None, :]
        return torch.where(ok, h / den, torch.zeros_like(h))


def _first_scale(k: Tensor) -> Tensor:
    """One constant per layer, ``1 / mean(diag K)`` of the first batch (1 where that is ~0)."""
    d = k.diagonal(dim1=-2, dim2=-1).mean(-1)
    fi = torch.finfo(k.dtype)
    ok = d > fi.tiny / fi.eps
    return torch.where(ok, 1 / torch.where(ok, d, torch.ones_like(d)), torch.ones_like(d))


def minibatch_cka(
    batches: Iterable[Sequence[Tensor] | tuple[Sequence[Tensor], Sequence[Tensor]]],
    *,
    symmetric: bool = False,
    center_dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> Tensor:
    """Minibatch CKA map from an iterable of batches of activations.

    ``symmetric=False``: each item is ``(xs, ys)`` (lists of A's and B's layer activations);
    ``symmetric=True``: each item is ``xs`` (A against itself). Returns ``(L_A, L_B)``."""
    acc: Optional[MinibatchCKA] = None
    for item in batches:
        if symmetric:
            xs, ys = item, None
        else:
            xs, ys = item
        if acc is None:
            acc = MinibatchCKA(len(xs), None if symmetric else len(ys),
                               center_dtype=center_dtype, backend=backend)
        acc.update(xs, ys)
    if acc is None:
        raise ValueError("no batches")
    return acc.compute()
