"""Forward of ``gram`` and ``cross``: grouped split-K ``out = A'ᵀ B'`` for many products in one
launch (:func:`forward_kernel`) and its split-K finalize pass (:func:`forward_finalize_kernel`).
Reference: ``backends/reference.py`` (``gram``, ``cross``); math: ``docs/design.md``.

One launch covers every layer (and every pair) of a call. The host builds, from shapes only,

* a *problem* table (``FP_*`` fields, :mod:`.tables`): sizes ``K, M, N``, the element strides of
  ``A (K x M)``, ``B (K x N)`` and of the ``(M, N)`` output, a symmetric flag and a column-sum
  flag;
* a *tile* table (``FT_*``): ``(problem, ti, tj, ws_off)``: one ``BM x BN``
  output tile; symmetric problems (``A is B``) get only the tiles with ``ti <= tj``;
  ``ws_off < 0`` marks a tile whose K range is not split (the kernel stores it straight into the
  output), otherwise its fp32 partial sums are atomically added into a zeroed workspace at
  ``ws_off`` and :func:`forward_finalize_kernel` writes it out;
* an *item* table (``FI_*``): ``(tile, k0, k1)``: one program each.

Per call only the data pointers change: they are passed as element offsets from one base
tensor per operand (``a_base + a_off``), in a small pointer table (``FQ_*``)
``(a_off, b_off, out_off, cs_off)``.

The gram ``x xᵀ`` is ``Aᵀ B`` with ``A = B = xᵀ`` (strides swapped, no copy).
The feature-space products are ``Aᵀ B`` with ``A, B ∈ {x, y}``; the column sums of ``A`` come
for free from the diagonal tiles of ``xᵀx`` / ``yᵀy`` (``cs_off >= 0``).

Symmetric problems: an off-diagonal tile is also written transposed into the lower triangle;
a diagonal tile is written as ``(T + Tᵀ)/2`` so that every output is exactly symmetric.

Row shift (the backend contract): every product is of ``x' = x - 1 x[0]``. The kernel subtracts
the reference sample as it loads, from the same operand (no copy, no extra pass). ``SHIFT``
(compile time, one per launch) says where the sample axis is:

* ``1`` (gram view, ``A = xᵀ``): samples are ``M`` / ``N``; ``A'[k, m] = A[k, m] - A[k, 0]``
  (i.e. ``x[m, k] - x[0, k]``): a ``BK`` vector of row 0 is loaded with each K step;
* ``2`` (feature view, ``A = x``): samples are ``K``; ``A'[k, m] = A[k, m] - A[0, m]``: a ``BM``
  vector (``BN`` for ``B``) is loaded once before the K loop, and the K tail of ``A'`` is
  re-zeroed (that of ``B'`` then only meets zeros);
* ``0``: no shift.

The column sums are those of ``A'``.
"""

import triton
import triton.language as tl

from guidance_kernels.kernels import tables as T
from guidance_kernels.kernels.triton_util import tile_offsets, vec_offsets


@triton.jit
def _store_tile(acc, cs, out_ptr, cs_ptr, rm, rn, M, N, so_m, so_n, sym, diag, has_cs,
                BM: tl.constexpr, BN: tl.constexpr):
    """Write one finished fp32 tile (and the column sums of a diagonal tile)."""
    if sym != 0:
        if diag:
            acc = 0.5 * (acc + tl.trans(acc))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * so_m + rn[None, :] * so_n, acc, mask=mask)
    if sym != 0:
        if not diag:
            # mirror: out[rn, rm] = acc[rm, rn]
            tl.store(out_ptr + rn[None, :] * so_m + rm[:, None] * so_n, acc, mask=mask)
    if has_cs != 0:
        if diag:
            tl.store(cs_ptr + rm, cs, mask=rm < M)


@triton.jit
def forward_kernel(
    a_base, b_base, out_base, cs_base, ws_ptr,
    prob_ptr, ptr_ptr, tile_ptr, item_ptr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr,
):
    """``A_LAYOUT``: 1 if ``sa_m == 1``, 2 if ``sa_k == 1`` for all problems (else 0);
    ``B_LAYOUT``: 1 if ``sb_k == 1``, 2 if ``sb_n == 1``; ``ALIGN``: every size, used stride,
    K boundary and pointer offset is a multiple of 8 elements (vectorizable, unmasked-friendly);
    ``SHIFT``: the row shift (module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.load(item_ptr + pid * T.FI_WIDTH + T.FI_TILE)
    k0 = tl.load(item_ptr + pid * T.FI_WIDTH + T.FI_K0)
    k1 = tl.load(item_ptr + pid * T.FI_WIDTH + T.FI_K1)
    prob = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_PROB)
    ti = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_I)
    tj = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_J)
    ws_off = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_WS)
    pp = prob_ptr + prob * T.FP_WIDTH
    M = tl.load(pp + T.FP_M)
    N = tl.load(pp + T.FP_N)
    sa_k = tl.load(pp + T.FP_SA_K)
    sa_m = tl.load(pp + T.FP_SA_M)
    sb_k = tl.load(pp + T.FP_SB_K)
    sb_n = tl.load(pp + T.FP_SB_N)
    sym = tl.load(pp + T.FP_SYM)
    has_cs = tl.load(pp + T.FP_CS)
    qp = ptr_ptr + prob * T.FQ_WIDTH
    a_off = tl.load(qp + T.FQ_A)
    b_off = tl.load(qp + T.FQ_B)

    rm = ti * BM + tl.arange(0, BM)
    rn = tj * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    diag = ti == tj
    do_cs = (has_cs != 0) & diag

    if ALIGN:  # hints written here, not in a helper: the inliner drops callee arg attributes
        M = tl.multiple_of(M, 8)
        N = tl.multiple_of(N, 8)
        k0 = tl.multiple_of(k0, 8)
        k1 = tl.multiple_of(k1, 8)
        a_off = tl.multiple_of(a_off, 8)
        b_off = tl.multiple_of(b_off, 8)
        sa_k = tl.multiple_of(sa_k, 8)
        sa_m = tl.multiple_of(sa_m, 8)
        sb_k = tl.multiple_of(sb_k, 8)
        sb_n = tl.multiple_of(sb_n, 8)
    a_ptr = a_base + a_off
    b_ptr = b_base + b_off
    a_ptrs = a_ptr + tile_offsets(rm, k0 + rk, sa_m, sa_k, A_LAYOUT)
    b_ptrs = b_ptr + tile_offsets(k0 + rk, rn, sb_k, sb_n, B_LAYOUT)
    m_ok = rm < M
    n_ok = rn < N
    if SHIFT == 1:  # reference sample m = 0 / n = 0: a vector along K, loaded per K step
        sa_ptrs = a_ptr + vec_offsets(k0 + rk, sa_k, A_LAYOUT == 2)
        sb_ptrs = b_ptr + vec_offsets(k0 + rk, sb_k, B_LAYOUT == 1)
    if SHIFT == 2:  # reference sample k = 0: vectors along M / N, loaded once
        has_row = k1 > k0  # (n = 0: no row 0 to read)
        sa = tl.load(a_ptr + vec_offsets(rm, sa_m, A_LAYOUT == 1), mask=m_ok & has_row, other=0.0)
        sb = tl.load(b_ptr + vec_offsets(rn, sb_n, B_LAYOUT == 2), mask=n_ok & has_row, other=0.0)
        if UPCAST:
            sa = sa.to(tl.float32)
            sb = sb.to(tl.float32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    cs = tl.zeros((BM,), dtype=tl.float32)
    for k in range(k0, k1, BK):
        k_ok = (k + rk) < k1
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if SHIFT == 1:
            ra = tl.load(sa_ptrs, mask=k_ok, other=0.0)
            rb = tl.load(sb_ptrs, mask=k_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if SHIFT == 1:
                ra = ra.to(tl.float32)
                rb = rb.to(tl.float32)
        if SHIFT == 1:  # out-of-range k: 0 - 0
            a = a - ra[None, :]
            b = b - rb[:, None]
        if SHIFT == 2:  # out-of-range k would be 0 - ref: zero A's tail (B's meets zeros)
            a = tl.where(k_ok[None, :], a - sa[:, None], 0.0).to(a.dtype)
            b = b - sb[None, :]
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if do_cs:
            cs += tl.sum(a.to(tl.float32), axis=1)
        if A_LAYOUT == 2:
            a_ptrs += BK
        else:
            a_ptrs += BK * sa_k
        if B_LAYOUT == 1:
            b_ptrs += BK
        else:
            b_ptrs += BK * sb_k
        if SHIFT == 1:
            if A_LAYOUT == 2:
                sa_ptrs += BK
            else:
                sa_ptrs += BK * sa_k
            if B_LAYOUT == 1:
                sb_ptrs += BK
            else:
                sb_ptrs += BK * sb_k

    if ws_off < 0:
        so_m = tl.load(pp + T.FP_SO_M)
        so_n = tl.load(pp + T.FP_SO_N)
        out_off = tl.load(qp + T.FQ_OUT)
        cs_off = tl.load(qp + T.FQ_CS)
        _store_tile(acc, cs, out_base + out_off, cs_base + cs_off, rm, rn, M, N, so_m, so_n,
                    sym, diag, has_cs, BM, BN)
    else:
        r = tl.arange(0, BM)
        c = tl.arange(0, BN)
        tl.atomic_add(ws_ptr + ws_off + r[:, None] * BN + c[None, :], acc, sem="relaxed")
        if do_cs:
            tl.atomic_add(ws_ptr + ws_off + BM * BN + r, cs, sem="relaxed")


@triton.jit
def forward_finalize_kernel(
    out_base, cs_base, ws_ptr, prob_ptr, ptr_ptr, tile_ptr, fin_ptr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """One program per split tile (``fin_ptr`` lists them): workspace -> output (+ mirror)."""
    tile = tl.load(fin_ptr + tl.program_id(0).to(tl.int64))
    prob = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_PROB)
    ti = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_I)
    tj = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_J)
    ws_off = tl.load(tile_ptr + tile * T.FT_WIDTH + T.FT_WS)
    pp = prob_ptr + prob * T.FP_WIDTH
    M = tl.load(pp + T.FP_M)
    N = tl.load(pp + T.FP_N)
    so_m = tl.load(pp + T.FP_SO_M)
    so_n = tl.load(pp + T.FP_SO_N)
    sym = tl.load(pp + T.FP_SYM)
    has_cs = tl.load(pp + T.FP_CS)
    qp = ptr_ptr + prob * T.FQ_WIDTH
    out_off = tl.load(qp + T.FQ_OUT)
    cs_off = tl.load(qp + T.FQ_CS)
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    acc = tl.load(ws_ptr + ws_off + r[:, None] * BN + c[None, :])
    diag = ti == tj
    cs = tl.zeros((BM,), dtype=tl.float32)
    if (has_cs != 0) & diag:
        cs = tl.load(ws_ptr + ws_off + BM * BN + r)
    _store_tile(acc, cs, out_base + out_off, cs_base + cs_off, ti * BM + r, tj * BN + c, M, N,
                so_m, so_n, sym, diag, has_cs, BM, BN)
