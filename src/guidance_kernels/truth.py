"""The fp64 truth every fast path is compared with: plain formulas, fp64, no kernels.

One copy, used by the bench (``bench/baselines.py``, ``bench/runner.py``, ``bench/e2e.py``) and
by the peer comparison of ``similarity/peers.py``. The math is in ``docs/design.md``:

* ``cka(x, y)``: biased linear CKA of ``x (n, p)`` and ``y (n, q)`` (centred columns), through
  the cheaper of the sample / feature forms (``planning.choose_form``); fp64 0-dim tensor.
* ``hsic_unbiased(k, l)``: Song et al. (2012) unbiased HSIC of Grams ``(..., n, n)``, batched
  over the leading dims.
* ``debiased_cka(x, y)``: CKA from ``hsic_unbiased`` of the raw (uncentred) Grams.
* ``loss_and_grad(xs, ys, metric, grad)``: ``sum_l (1 - score_l)`` and, if asked, d/d xs.
* ``minibatch_cka(acts_a, acts_b, batch_size)``: Nguyen et al.'s minibatch CKA map
  ``(La, Lb)``, unbiased HSIC summed over equal batches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from guidance_kernels.planning import choose_form

__all__ = ["flat64", "cka", "hsic_unbiased", "debiased_cka", "loss_and_grad", "minibatch_cka"]


def flat64(t: Tensor) -> Tensor:
    """``(n, *shape)`` -> ``(n, prod(shape))`` fp64."""
    return t.flatten(1).double()


def cka(x: Tensor, y: Tensor) -> Tensor:
    """Biased linear CKA of ``x (n, p)``, ``y (n, q)`` in fp64 (0-dim)."""
    x, y = flat64(x), flat64(y)
    n, p = x.shape
    q = y.shape[1]
    x = x - x.mean(0)
    y = y - y.mean(0)
    if choose_form(n, p, q) == "feature":
        s = (x.T @ y).square().sum()
        a = torch.linalg.matrix_norm(x.T @ x)
        b = torch.linalg.matrix_norm(y.T @ y)
    else:
        k, l_ = x @ x.T, y @ y.T
        s = (k * l_).sum()
        a, b = torch.linalg.matrix_norm(k), torch.linalg.matrix_norm(l_)
    return s / (a * b)


def hsic_unbiased(k: Tensor, l_: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) of symmetric Grams ``(..., n, n)``, ``n >= 4``, straight
    from the formula; returns ``(...)``."""
    n = k.shape[-1]
    k = k - torch.diag_embed(k.diagonal(dim1=-2, dim2=-1))
    l_ = l_ - torch.diag_embed(l_.diagonal(dim1=-2, dim2=-1))
    tr_kl = (k * l_.mT).sum((-2, -1))  # tr(K L), without the n³ product
    sum_kl = (k.sum(-1) * l_.sum(-2)).sum(-1)  # 1ᵀ K L 1
    sk, sl = k.sum((-2, -1)), l_.sum((-2, -1))
    return (tr_kl + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * sum_kl) / (n * (n - 3))


def debiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """Debiased linear CKA of ``x (n, p)``, ``y (n, q)`` in fp64 (0-dim)."""
    x, y = flat64(x), flat64(y)
    k, l_ = x @ x.T, y @ y.T
    return hsic_unbiased(k, l_) / torch.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l_, l_))


def loss_and_grad(
    xs: Sequence[Tensor], ys: Sequence[Tensor], metric: str = "cka", grad: bool = False
) -> tuple[float, Optional[list[Tensor]]]:
    """fp64 loss ``sum_l (1 - score(xs[l], ys[l]))`` (``metric``: ``"cka"`` or
    ``"debiased_cka"``) and, if ``grad``, the fp64 gradients d loss / d xs (shapes of xs)."""
    f = cka if metric == "cka" else debiased_cka
    total = 0.0
    grads = [] if grad else None
    for x, y in zip(xs, ys):
        x64 = flat64(x.detach()).requires_grad_(grad)
        with torch.enable_grad() if grad else torch.no_grad():
            v = 1.0 - f(x64, flat64(y.detach()))
        total += float(v.detach())
        if grad:
            (g,) = torch.autograd.grad(v, x64)
            grads.append(g.reshape(x.shape))
    return total, grads


def minibatch_cka(acts_a: Sequence[Tensor], acts_b: Sequence[Tensor], batch_size: int) -> Tensor:
    """Minibatch CKA map ``(len(acts_a), len(acts_b))`` fp64 of activations ``(N, *shape)``:
    unbiased HSIC summed over the batches ``[s, s + batch_size)`` (a short last batch is
    dropped), then ``sum HSIC(K, L) / sqrt(sum HSIC(K, K) sum HSIC(L, L))``."""
    n_total = acts_a[0].shape[0]
    starts = range(0, n_total - batch_size + 1, batch_size)

    def grams(acts):
        out = []
        for a in acts:
            batches = [flat64(a[s : s + batch_size]) for s in starts]
            out.append(torch.stack([b @ b.T for b in batches]))
        return out

    ka, kb = grams(acts_a), grams(acts_b)
    sa = torch.stack([hsic_unbiased(k, k).sum() for k in ka])
    sb = torch.stack([hsic_unbiased(k, k).sum() for k in kb])
    out = torch.zeros(len(ka), len(kb), dtype=torch.float64)
    for i, k in enumerate(ka):
        for j, l_ in enumerate(kb):
            out[i, j] = hsic_unbiased(k, l_).sum() / torch.sqrt(sa[i] * sb[j])
    return out
