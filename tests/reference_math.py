"""Independent, obviously-correct float64 implementations used only by the tests.

Written from the textbook formulas with explicit ``n x n`` centering matrices, sharing no code
with the package."""

import torch


def _flat64(x):
    return x.reshape(x.shape[0], -1).to(torch.float64)


def centering(n, like):
    return torch.eye(n, dtype=torch.float64, device=like.device) - 1.0 / n


def hsic_biased(k, l):
    h = centering(k.shape[0], k)
    return torch.trace(h @ k @ h @ h @ l @ h)


def cka(x, y):
    x, y = _flat64(x), _flat64(y)
    k, l = x @ x.T, y @ y.T
    return hsic_biased(k, l) / torch.sqrt(hsic_biased(k, k) * hsic_biased(l, l))


def hsic_unbiased(k, l):
    """Song et al. (2012), eq. (5)."""
    n = k.shape[0]
    kt = k - torch.diag(torch.diag(k))
    lt = l - torch.diag(torch.diag(l))
    one = torch.ones(n, 1, dtype=torch.float64, device=k.device)
    term1 = torch.trace(kt @ lt)
    term2 = (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    return ((term1 + term2 - term3) / (n * (n - 3))).squeeze()


def debiased_cka(x, y):
    # the estimator is invariant to per-feature shifts; centering X first keeps Song's formula
    # (sums of large uncentered Gram entries) from cancelling on inputs with an offset
    x, y = _flat64(x), _flat64(y)
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return hsic_unbiased(k, l) / torch.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))


def procrustes(x, y, angular=False):
    """Squared distance 2 - 2 ||Xnᵀ Yn||_* via the SVD of the feature-space cross product."""
    x, y = _flat64(x), _flat64(y)
    hx = centering(x.shape[0], x) @ x
    hy = centering(y.shape[0], y) @ y
    hx, hy = hx / torch.linalg.norm(hx), hy / torch.linalg.norm(hy)
    nuc = torch.linalg.svdvals(hx.T @ hy).sum()
    return torch.arccos(nuc.clamp(max=1.0)) if angular else 2 - 2 * nuc


METRIC_FNS = {
    "cka": cka,
    "debiased_cka": debiased_cka,
    "procrustes": procrustes,
    "angular_procrustes": lambda x, y: procrustes(x, y, angular=True),
}
