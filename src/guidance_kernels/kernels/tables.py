"""Layout of the int64 descriptor tables the Triton kernels decode: one definition, read by the
kernels (as ``tl.constexpr`` field offsets) and by the host planner
(:mod:`guidance_kernels.backends.triton_plan`, which packs rows with :func:`pack`).

Each table is row-major, ``*_WIDTH`` int64 fields a row; ``X_F`` is the offset of field ``F``.

Forward (``gram`` / ``cross`` forward, :mod:`.triton_forward`): ``out = A'ᵀ B'``

* problem table ``FP_*``, one row per product: sizes ``K, M, N``; element strides of
  ``A (K x M)``, ``B (K x N)`` and the ``(M, N)`` output; symmetric flag; column-sum flag;
* pointer table ``FQ_*`` (per call): element offsets of ``A``, ``B``, the output and the column
  sums (``-1``: none) from one base tensor per operand;
* tile table ``FT_*``: ``(problem, ti, tj, ws_off)``, ``ws_off < 0``: K range not split;
* item table ``FI_*``: ``(tile, k0, k1)``, one program each.

Backward (``gram_backward`` / ``cross_backward``, :mod:`.triton_backward`):
``out = A' W + A2' W2 + v``

* problem table ``BP_*``: sizes ``R, C, K, K2``; strides of ``A (R x K)``, ``W (K x C)``,
  ``A2 (R x K2)``, ``W2 (K2 x C)`` and ``out (R x C)``;
* pointer table ``BQ_*`` (per call): offsets of ``A, W, A2, W2, v, out``;
* tile table ``BT_*``: ``(problem, tr, tc)``, one program each.

Statistics (``gram_stats``, :mod:`.triton_stats`): output rows ``S_*`` of
``(Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L)``.
"""

import triton.language as tl

# forward problem table
FP_K = tl.constexpr(0)
FP_M = tl.constexpr(1)
FP_N = tl.constexpr(2)
FP_SA_K = tl.constexpr(3)
FP_SA_M = tl.constexpr(4)
FP_SB_K = tl.constexpr(5)
FP_SB_N = tl.constexpr(6)
FP_SO_M = tl.constexpr(7)
FP_SO_N = tl.constexpr(8)
FP_SYM = tl.constexpr(9)
FP_CS = tl.constexpr(10)
FP_WIDTH = tl.constexpr(11)
# forward pointer table
FQ_A = tl.constexpr(0)
FQ_B = tl.constexpr(1)
FQ_OUT = tl.constexpr(2)
FQ_CS = tl.constexpr(3)
FQ_WIDTH = tl.constexpr(4)
# forward tile table
FT_PROB = tl.constexpr(0)
FT_I = tl.constexpr(1)
FT_J = tl.constexpr(2)
FT_WS = tl.constexpr(3)
FT_WIDTH = tl.constexpr(4)
# forward item table
FI_TILE = tl.constexpr(0)
FI_K0 = tl.constexpr(1)
FI_K1 = tl.constexpr(2)
FI_WIDTH = tl.constexpr(3)

# backward problem table
BP_R = tl.constexpr(0)
BP_C = tl.constexpr(1)
BP_K = tl.constexpr(2)
BP_K2 = tl.constexpr(3)
BP_SA_R = tl.constexpr(4)
BP_SA_K = tl.constexpr(5)
BP_SW_K = tl.constexpr(6)
BP_SW_C = tl.constexpr(7)
BP_SA2_R = tl.constexpr(8)
BP_SA2_K = tl.constexpr(9)
BP_SW2_K = tl.constexpr(10)
BP_SW2_C = tl.constexpr(11)
BP_SO_R = tl.constexpr(12)
BP_SO_C = tl.constexpr(13)
BP_WIDTH = tl.constexpr(14)
# backward pointer table
BQ_A = tl.constexpr(0)
BQ_W = tl.constexpr(1)
BQ_A2 = tl.constexpr(2)
BQ_W2 = tl.constexpr(3)
BQ_V = tl.constexpr(4)
BQ_OUT = tl.constexpr(5)
BQ_WIDTH = tl.constexpr(6)
# backward tile table
BT_PROB = tl.constexpr(0)
BT_R = tl.constexpr(1)
BT_C = tl.constexpr(2)
BT_WIDTH = tl.constexpr(3)

# statistics output row
S_KL = tl.constexpr(0)
S_KK = tl.constexpr(1)
S_LL = tl.constexpr(2)
S_TK = tl.constexpr(3)
S_TL = tl.constexpr(4)
S_WIDTH = tl.constexpr(5)


def pack(width, *fields) -> tuple:
    """One table row: ``fields`` are ``(offset, value)`` pairs, one per field of the row."""
    out = [None] * int(width)
    for off, value in fields:
        if out[int(off)] is not None:
            raise ValueError(f"field {int(off)} packed twice")
        out[int(off)] = int(value)
    if None in out:
        raise ValueError(f"fields {[i for i, v in enumerate(out) if v is None]} not packed")
    return tuple(out)
