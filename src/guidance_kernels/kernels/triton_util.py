"""Small ``@triton.jit`` helpers shared by the kernels: strided tile / vector offsets with a
compile-time unit stride (so the compiler can vectorize contiguous loads). Alignment hints
(``tl.multiple_of``) are written in the kernel bodies: on a helper's arguments they would be
lost when the helper is inlined."""

import triton
import triton.language as tl


@triton.jit
def tile_offsets(r, c, s_r, s_c, LAYOUT: tl.constexpr):
    """Element offsets ``r[:, None] * s_r + c[None, :] * s_c`` of a 2-D tile. ``LAYOUT`` 1: the
    host saw ``s_r == 1`` for every problem of the launch; 2: ``s_c == 1``; 0: general."""
    if LAYOUT == 1:
        o = r[:, None] + c[None, :] * s_c
    elif LAYOUT == 2:
        o = r[:, None] * s_r + c[None, :]
    else:
        o = r[:, None] * s_r + c[None, :] * s_c
    return o


@triton.jit
def vec_offsets(i, s, UNIT: tl.constexpr):
    """Element offsets ``i * s`` of a 1-D vector; ``UNIT``: the host saw ``s == 1``."""
    if UNIT:
        o = i
    else:
        o = i * s
    return o
