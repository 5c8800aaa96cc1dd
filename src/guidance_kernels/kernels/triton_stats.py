"""``gram_stats``: CKA statistics of stacked centered Grams, one launch for every pair
(reference: ``metrics.gram_stats``; math: ``docs/design.md``).

``stats_kernel``: ``K``, ``L``: ``(P, n, n)`` contiguous fp32 (or fp64); grid ``(P, NB)``.
Program ``(p, b)`` reads the flattened chunks ``b, b + NB, ...`` (``BLOCK`` elements each) of
pair ``p`` and writes its partial sums, accumulated in fp64 (no overflow for any fp32 input),
to ``OUT[p, b, :]`` (``S_*`` of :mod:`.tables`) ``= (Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)``. The host sums over ``b`` (a
deterministic order).
"""

import triton
import triton.language as tl

from guidance_kernels.kernels import tables as T


@triton.jit
def stats_kernel(K, L, OUT, NN, N1, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    nb = tl.num_programs(1)
    base = p * NN
    kl = tl.zeros((BLOCK,), dtype=tl.float64)
    kk = tl.zeros((BLOCK,), dtype=tl.float64)
    ll = tl.zeros((BLOCK,), dtype=tl.float64)
    tk = tl.zeros((BLOCK,), dtype=tl.float64)
    tl_ = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(b * BLOCK, NN, nb * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < NN
        k = tl.load(K + base + offs, mask=m, other=0.0).to(tl.float64)
        l = tl.load(L + base + offs, mask=m, other=0.0).to(tl.float64)
        kl += k * l
        kk += k * k
        ll += l * l
        diag = (offs % N1) == 0  # flat index i * (n + 1): a diagonal element
        tk += tl.where(diag, k, 0.0)
        tl_ += tl.where(diag, l, 0.0)
    o = OUT + (p * nb + b) * T.S_WIDTH
    tl.store(o + T.S_KL, tl.sum(kl, 0))
    tl.store(o + T.S_KK, tl.sum(kk, 0))
    tl.store(o + T.S_LL, tl.sum(ll, 0))
    tl.store(o + T.S_TK, tl.sum(tk, 0))
    tl.store(o + T.S_TL, tl.sum(tl_, 0))
