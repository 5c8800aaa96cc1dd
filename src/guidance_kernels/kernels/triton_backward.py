"""Backward of ``gram`` and ``cross`` (the ``gram_backward`` / ``cross_backward`` ops): grouped
``out = A' W + A2' W2 + v`` for many products in one launch (:func:`backward_kernel`).
Reference: ``backends/reference.py`` (``gram_backward``, ``cross_backward``); math:
``docs/design.md``.

``A (R x K)`` and ``A2 (R x K2)`` are activations (read in their own dtype, any strides),
``W (K x C)`` and ``W2 (K2 x C)`` small fp32 matrices, ``v (C,)`` an fp32 row added to every
row, ``out (R x C)`` an activation-sized output written once, in the activation dtype.

* ``gram_backward``: ``m x`` is computed transposed, ``(m x)ᵀ = xᵀ mᵀ``: ``A = xᵀ``,
  ``W = mᵀ``, ``out = dxᵀ`` (all by strides, nothing is copied).
* ``cross_backward``: ``x m + y n + v``: ``A = x``, ``W = m``, ``A2 = y``, ``W2 = n``.

The host builds a problem table (``BP_*`` fields, :mod:`.tables`), a per-call pointer table
(``BQ_*``: element offsets from one base tensor per operand) and a tile table (``BT_*``:
``(problem, tr, tc)``);
one program per ``BM x BN`` output tile; every program runs the full K loop (no split: the
output is activation-sized, so there are always enough tiles).

Precision: with ``ROUND_W`` (A and A2 of one 16-bit dtype) the fp32 ``W`` is rounded to the
activation dtype for the tensor-core ``dot`` (bf16: the same relative error as the bf16 output
itself); otherwise (fp32, or mixed dtypes with ``UPCAST``) the dot runs in exact fp32. fp16 has a narrow exponent range and
CKA gradients are tiny (``~1/(n² p)``), so with ``SCALE`` each program first finds the largest
``|W|`` of each of its output columns, divides ``W`` by it before rounding and multiplies the
fp32 accumulator back.

Row shift (the backend contract): ``A`` and ``A2`` are read as ``x' = x - 1 x[0]``, the reference
sample subtracted as they load. ``SHIFT`` (compile time, one per launch) says where the sample
axis is: ``1`` (``cross_backward``, ``A = x``): samples are the rows ``R``, ``A'[r, k] = A[r, k] -
A[0, k]``, a ``BK`` vector of row 0 loaded per K step; ``2`` (``gram_backward``, ``A = xᵀ``):
samples are ``K``, ``A'[r, k] = A[r, k] - A[r, 0]``, a ``BM`` vector loaded once (the K tail is
re-zeroed); ``0``: no shift.
"""

import triton
import triton.language as tl

from guidance_kernels.kernels import tables as T
from guidance_kernels.kernels.triton_util import tile_offsets, vec_offsets


@triton.jit
def _cast(x, dt: tl.constexpr, RNE_FIX: tl.constexpr):
    """fp32 -> ``dt``. The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest
    even); with ``RNE_FIX`` the value is rounded to nearest even first, so the cast is exact."""
    if RNE_FIX:
        if dt == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _colmax(wmax, w_ptr, K, sw_k, sw_c, rc, c_ok, BK: tl.constexpr, W_LAYOUT: tl.constexpr):
    rk = tl.arange(0, BK)
    for k in range(0, K, BK):
        k_ok = (k + rk) < K
        w = tl.load(w_ptr + tile_offsets(k + rk, rc, sw_k, sw_c, W_LAYOUT),
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        wmax = tl.maximum(wmax, tl.max(tl.abs(w), axis=0))
    return wmax


@triton.jit
def _term(acc, a_ptr, w_ptr, K, sa_r, sa_k, sw_k, sw_c, rr, rc, r_ok, c_ok, inv,
          BK: tl.constexpr, A_LAYOUT: tl.constexpr, W_LAYOUT: tl.constexpr,
          SCALE: tl.constexpr, ROUND_W: tl.constexpr, UPCAST: tl.constexpr,
          PREC: tl.constexpr, RNE_FIX: tl.constexpr, SHIFT: tl.constexpr):
    """acc += A'[rr, :K] @ W[:K, rc] (``A'``: ``A`` row-shifted, see ``SHIFT``)."""
    dt = a_ptr.dtype.element_ty
    rk = tl.arange(0, BK)
    if SHIFT == 2:  # reference sample k = 0: a vector along R, loaded once
        ref = tl.load(a_ptr + vec_offsets(rr, sa_r, A_LAYOUT == 1), mask=r_ok & (K > 0), other=0.0)
        if UPCAST:
            ref = ref.to(tl.float32)
    for k in range(0, K, BK):
        k_ok = (k + rk) < K
        a = tl.load(a_ptr + tile_offsets(rr, k + rk, sa_r, sa_k, A_LAYOUT),
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + tile_offsets(k + rk, rc, sw_k, sw_c, W_LAYOUT),
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if SHIFT == 1:  # reference sample r = 0: a vector along K (out-of-range k: 0 - 0)
            ref = tl.load(a_ptr + vec_offsets(k + rk, sa_k, A_LAYOUT == 2), mask=k_ok, other=0.0)
        if SCALE:
            w = w * inv[None, :]
        if ROUND_W:
            w = _cast(w, dt, RNE_FIX)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
            if SHIFT == 1:
                ref = ref.to(tl.float32)
        if SHIFT == 1:
            a = a - ref[None, :]
        if SHIFT == 2:
            # the K tail would be 0 - ref; W is 0 there, so the select is not needed for the
            # result, but without it the sm_90 build loads ref with scalar 2-byte loads
            a = tl.where(k_ok[None, :], a - ref[:, None], 0.0).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    return acc


@triton.jit
def backward_kernel(
    a_base, w_base, a2_base, w2_base, v_base, out_base,
    prob_ptr, ptr_ptr, tile_ptr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_A2: tl.constexpr, HAS_V: tl.constexpr, SCALE: tl.constexpr,
    ROUND_W: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, RNE_FIX: tl.constexpr,
    A_LAYOUT: tl.constexpr, W_LAYOUT: tl.constexpr, O_LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """Layouts (see ``triton_util.tile_offsets``) hold for every problem of the launch, A2/W2
    included: ``A_LAYOUT`` 1: ``sa_r == 1``, 2: ``sa_k == 1``; ``W_LAYOUT`` 1: ``sw_k == 1``,
    2: ``sw_c == 1``; ``O_LAYOUT`` 1: ``so_r == 1``, 2: ``so_c == 1``. ``ALIGN``: every size,
    used stride and pointer offset is a multiple of 8 elements. ``SHIFT``: the row shift of A and
    A2 (module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    prob = tl.load(tile_ptr + pid * T.BT_WIDTH + T.BT_PROB)
    tr = tl.load(tile_ptr + pid * T.BT_WIDTH + T.BT_R)
    tc = tl.load(tile_ptr + pid * T.BT_WIDTH + T.BT_C)
    pp = prob_ptr + prob * T.BP_WIDTH
    qp = ptr_ptr + prob * T.BQ_WIDTH
    R = tl.load(pp + T.BP_R)
    C = tl.load(pp + T.BP_C)
    K = tl.load(pp + T.BP_K)
    sa_r = tl.load(pp + T.BP_SA_R)
    sa_k = tl.load(pp + T.BP_SA_K)
    sw_k = tl.load(pp + T.BP_SW_K)
    sw_c = tl.load(pp + T.BP_SW_C)
    a_off = tl.load(qp + T.BQ_A)
    w_off = tl.load(qp + T.BQ_W)
    if ALIGN:  # hints written here, not in a helper: the inliner drops callee arg attributes
        R = tl.multiple_of(R, 8)
        C = tl.multiple_of(C, 8)
        K = tl.multiple_of(K, 8)
        sa_r = tl.multiple_of(sa_r, 8)
        sa_k = tl.multiple_of(sa_k, 8)
        sw_k = tl.multiple_of(sw_k, 8)
        sw_c = tl.multiple_of(sw_c, 8)
        a_off = tl.multiple_of(a_off, 8)
        w_off = tl.multiple_of(w_off, 8)
    a_ptr = a_base + a_off
    w_ptr = w_base + w_off

    rr = tr * BM + tl.arange(0, BM)
    rc = tc * BN + tl.arange(0, BN)
    r_ok = rr < R
    c_ok = rc < C
    dt = a_base.dtype.element_ty

    if HAS_A2:
        K2 = tl.load(pp + T.BP_K2)
        sa2_r = tl.load(pp + T.BP_SA2_R)
        sa2_k = tl.load(pp + T.BP_SA2_K)
        sw2_k = tl.load(pp + T.BP_SW2_K)
        sw2_c = tl.load(pp + T.BP_SW2_C)
        a2_off = tl.load(qp + T.BQ_A2)
        w2_off = tl.load(qp + T.BQ_W2)
        if ALIGN:
            K2 = tl.multiple_of(K2, 8)
            sa2_r = tl.multiple_of(sa2_r, 8)
            sa2_k = tl.multiple_of(sa2_k, 8)
            sw2_k = tl.multiple_of(sw2_k, 8)
            sw2_c = tl.multiple_of(sw2_c, 8)
            a2_off = tl.multiple_of(a2_off, 8)
            w2_off = tl.multiple_of(w2_off, 8)
        a2_ptr = a2_base + a2_off
        w2_ptr = w2_base + w2_off

    # per-column scale of W (and W2), fp16 only
    scale = tl.full((BN,), 1.0, dtype=tl.float32)
    if SCALE:
        wmax = tl.zeros((BN,), dtype=tl.float32)
        wmax = _colmax(wmax, w_ptr, K, sw_k, sw_c, rc, c_ok, BK, W_LAYOUT)
        if HAS_A2:
            wmax = _colmax(wmax, w2_ptr, K2, sw2_k, sw2_c, rc, c_ok, BK, W_LAYOUT)
        scale = tl.where(wmax > 0, wmax, 1.0)
    inv = 1.0 / scale

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _term(acc, a_ptr, w_ptr, K, sa_r, sa_k, sw_k, sw_c, rr, rc, r_ok, c_ok, inv,
                BK, A_LAYOUT, W_LAYOUT, SCALE, ROUND_W, UPCAST, PREC, RNE_FIX, SHIFT)
    if HAS_A2:
        acc = _term(acc, a2_ptr, w2_ptr, K2, sa2_r, sa2_k, sw2_k, sw2_c, rr, rc, r_ok, c_ok, inv,
                    BK, A_LAYOUT, W_LAYOUT, SCALE, ROUND_W, UPCAST, PREC, RNE_FIX, SHIFT)
    if SCALE:
        acc = acc * scale[None, :]
    if HAS_V:
        v_off = tl.load(qp + T.BQ_V)
        if ALIGN:
            v_off = tl.multiple_of(v_off, 8)
        v = tl.load(v_base + v_off + rc, mask=c_ok, other=0.0)
        acc += v[None, :]
    so_r = tl.load(pp + T.BP_SO_R)
    so_c = tl.load(pp + T.BP_SO_C)
    o_off = tl.load(qp + T.BQ_OUT)
    if ALIGN:
        so_r = tl.multiple_of(so_r, 8)
        so_c = tl.multiple_of(so_c, 8)
        o_off = tl.multiple_of(o_off, 8)
    out_ptr = out_base + o_off
    tl.store(out_ptr + tile_offsets(rr, rc, so_r, so_c, O_LAYOUT), _cast(acc, dt, RNE_FIX),
             mask=r_ok[:, None] & c_ok[None, :])
