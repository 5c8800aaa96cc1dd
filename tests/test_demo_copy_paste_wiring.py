"""Copy-paste guidance wiring: which modules are paired, what is flattened, what the guide sees.

The guided run's loss must equal a float64 linear CKA computed by hand on the per-sample
flattened outputs ``(n, T * D)`` of each RNN layer and the Transformer block it is paired with,
the guide in eval mode and fed the same one-hot tokens.
"""

import torch

from guidance_kernels.data import copy_paste_tensors
from guidance_kernels.train.experiments import copy_paste as cp
from guidance_kernels.train.guidance import Guidance
from tolerance import assert_within


def _cka64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.double().reshape(a.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    a, b = a - a.mean(0), b - b.mean(0)
    return (b.T @ a).square().sum() / ((a.T @ a).square().sum().sqrt() * (b.T @ b).square().sum().sqrt())


def _spec():
    s = cp.spec()
    s.sizes.update(length=5, hidden=16, d=16, heads=2)
    return s


def test_copy_paste_pairs_and_loss_match_a_float64_reference():
    s = _spec()
    X, _ = copy_paste_tensors(32, length=5, symbols=8, seed=1)
    tgt, guide = cp.build_target(s, 0), cp.build_guide(s, 0)
    guide.train()                       # Guidance must run it in eval mode (and restore the mode)
    for p in guide.parameters():
        p.requires_grad_(False)
    g = Guidance(tgt, guide, target_layers=cp.target_layers(tgt), guide_layers=cp.guide_layers(guide),
                 alpha=1.0, metric="cka")
    try:
        assert [(p[0], p[1]) for p in g.pairs] == [("rnns.0", "blocks.0"), ("rnns.1", "blocks.1")]
        with g.record():
            tgt(X)
        loss = g.loss(X, 0)
    finally:
        g.close()
    assert guide.training
    # reference: the same forward by hand, float64 CKA on (n, T * D)
    with torch.no_grad():
        h1 = tgt.rnns[0](X)[0]
        h2 = tgt.rnns[1](h1)[0]
        guide.eval()
        T = X.shape[1]
        z = guide.embed(X) + guide.pos[:T]
        zs = []
        for b in guide.blocks:
            z = b(z, src_mask=guide.mask[:T, :T], is_causal=True)
            zs.append(z)
    assert h1.shape == (32, 11, 16) and zs[0].shape == (32, 11, 16)
    ref = (1 - _cka64(h1, zs[0])) + (1 - _cka64(h2, zs[1]))
    # two terms, each 1 - CKA in [0, 1]; Gram entries are sums of T * D = 176 products
    assert_within(loss, ref, dtype=torch.float32, k=11 * 16, scale=2.0)
    assert float(ref) > 1e-3          # not a trivially-zero loss
