"""Triton backend: the contract adapters (``gram``, ``gram_backward``, ``cross``,
``cross_backward``, ``gram_stats``; contract in ``docs/design.md``), every layer's products in
one grouped launch. Work lists, tuning and device tables: :mod:`.triton_plan`; kernels:
:mod:`guidance_kernels.kernels`.

Launches per call (independent of the number of layers / pairs):

* ``gram`` / ``cross``: one ``forward_kernel`` launch per dtype combination and layout class
  present (normally one), plus, when some problem's K dimension is split across programs, one
  workspace memset and one ``forward_finalize_kernel`` launch.
* ``gram_backward`` / ``cross_backward``: one ``backward_kernel`` launch per dtype combination
  and layout class.

Every product is of the row-shifted activation ``x' = x - 1 x[0]``: the kernels subtract the
first sample as they load (``SHIFT``, see ``kernels/triton_forward.py``). fp64 inputs
(verification only) are delegated to the reference backend.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from guidance_kernels import metrics
from guidance_kernels.backends import Backend, register_backend
from guidance_kernels.backends import reference as _ref
from guidance_kernels.planning import group_by

try:
    import triton

    from guidance_kernels.backends import triton_plan as _plan
    from guidance_kernels.backends.triton_plan import Tuning, tuning  # noqa: F401 - public
    from guidance_kernels.kernels import tables as T
    from guidance_kernels.kernels import triton_backward as _bwd
    from guidance_kernels.kernels import triton_forward as _fwd
    from guidance_kernels.kernels import triton_stats as _stats

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({e})"

_LOW = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fwd.forward_kernel, InterpretedFunction)


# whether the kernels were created under TRITON_INTERPRET=1 (fixed when they are defined)
_INTERPRETED = _IMPORT_ERROR is None and _kernels_interpreted()


def available(device: torch.device) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if _INTERPRETED:  # interpreted kernels would read device pointers on the host
            return "the Triton kernels were created under TRITON_INTERPRET=1 (CPU tensors only)"
        return None
    if device.type == "cpu":
        if _plan.interpreting() and _INTERPRETED:
            return None
        return (
            "Triton kernels run on CUDA; CPU tensors need TRITON_INTERPRET=1 set before "
            "guidance_kernels.backends.triton is imported"
        )
    return f"the triton backend does not support device type {device.type!r}"


def _launch_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- forward launches
def _fwd_problem(a, b, out, cs, K, M, N, sa_k, sa_m, sb_k, sb_n, sym):
    """One forward product ``out (M, N) = A'ᵀ B'`` (``A (K x M)``, ``B (K x N)`` indexed in the
    storage of ``a`` / ``b`` by the strides; ``cs``: an fp32 ``(M,)`` for the column sums of
    ``A'``, or None): ``(tensors, problem row)``."""
    row = T.pack(
        T.FP_WIDTH, (T.FP_K, K), (T.FP_M, M), (T.FP_N, N), (T.FP_SA_K, sa_k), (T.FP_SA_M, sa_m),
        (T.FP_SB_K, sb_k), (T.FP_SB_N, sb_n), (T.FP_SO_M, out.stride(0)), (T.FP_SO_N, out.stride(1)),
        (T.FP_SYM, int(sym)), (T.FP_CS, int(cs is not None)),
    )  # fmt: skip
    return (a, b, out, cs), row


def _run_forward(problems: list, shift: int):
    """``problems``: :func:`_fwd_problem` results (all ``a`` of one dtype, all ``b`` of one
    dtype); ``shift``: the kernel's ``SHIFT`` (1: samples are M/N, the gram view; 2: samples are
    K). Problems are classed by memory layout and alignment (one launch per class: normally
    one); a class whose unit strides and multiple-of-8 sizes/pointers are known at compile time
    gets vectorized, asynchronous (cp.async) loads on the GPU, the general class scalar loads."""
    classes: dict = {}
    for (a, b, _out, _cs), r in problems:
        a_pairs = [(r[T.FP_SA_M], r[T.FP_SA_K])]  # the A tile is (M x K)
        b_pairs = [(r[T.FP_SB_K], r[T.FP_SB_N])]
        a_lay, b_lay = _plan.layout(a_pairs), _plan.layout(b_pairs)
        sizes = (r[T.FP_K], r[T.FP_M], r[T.FP_N])
        align = (
            _plan.aligned(sizes, _plan.used_strides(a_pairs, a_lay), _plan.used_strides(b_pairs, b_lay))
            and _plan.ptr_aligned(a)
            and _plan.ptr_aligned(b)
        )
        classes.setdefault((a_lay, b_lay, align), []).append(((a, b, _out, _cs), r))
    for (a_lay, b_lay, align), group in classes.items():
        _launch_forward(group, a_lay, b_lay, align, shift)


def _launch_forward(problems: list, a_lay: int, b_lay: int, align: bool, shift: int):
    tensors = [t for t, _r in problems]
    a0, b0, out0, _ = tensors[0]
    device = out0.device
    wide = a0.dtype == torch.float32 or b0.dtype == torch.float32
    plan = _plan.forward_plan(tuple(r for _t, r in problems), wide, device)
    if plan.n_items == 0:  # every output is (0, 0) or (0,)
        return
    css = [cs for *_, cs in tensors if cs is not None]
    cs0 = css[0] if css else out0
    a_off = _plan.offsets([t[0] for t in tensors], a0)
    b_off = _plan.offsets([t[1] for t in tensors], b0)
    o_off = _plan.offsets([t[2] for t in tensors], out0)
    c_off = [(_plan.offsets([cs], cs0)[0] if cs is not None else -1) for *_, cs in tensors]
    rows = [
        T.pack(T.FQ_WIDTH, (T.FQ_A, a), (T.FQ_B, b), (T.FQ_OUT, o), (T.FQ_CS, c))
        for a, b, o, c in zip(a_off, b_off, o_off, c_off)
    ]
    ptrs = _plan.device_table(rows, device, T.FQ_WIDTH)
    if plan.ws_size:
        ws = torch.zeros(plan.ws_size, dtype=torch.float32, device=device)
    else:
        ws = out0  # never touched
    upcast, prec = _plan.flags(a0.dtype, b0.dtype)
    with _launch_ctx(device):
        _fwd.forward_kernel[(plan.n_items,)](
            a0, b0, out0, cs0, ws, plan.prob, ptrs, plan.tiles, plan.items,
            BM=plan.block, BN=plan.block, BK=plan.bk, UPCAST=upcast, PREC=prec,
            A_LAYOUT=a_lay, B_LAYOUT=b_lay, ALIGN=align, SHIFT=shift,
            num_warps=plan.warps, num_stages=plan.stages,
        )  # fmt: skip
        if plan.n_fin:
            _fwd.forward_finalize_kernel[(plan.n_fin,)](
                out0, cs0, ws, plan.prob, ptrs, plan.tiles, plan.fin,
                BM=plan.block, BN=plan.block, num_warps=8 if plan.block >= 128 else 4,
            )  # fmt: skip


# --------------------------------------------------------------------------- backward launches
def _bwd_problem(a, w, a2, w2, v, out, R, C, K, K2, sa_r, sa_k, sw_k, sw_c, sa2_r=0, sa2_k=0, sw2_k=0, sw2_c=0):
    """One backward product ``out (R x C) = A' W + A2' W2 + v`` (``w``/``w2``/``v`` fp32;
    ``a2``/``w2``/``v`` may be None): ``(tensors, problem row)``."""
    row = T.pack(
        T.BP_WIDTH, (T.BP_R, R), (T.BP_C, C), (T.BP_K, K), (T.BP_K2, K2),
        (T.BP_SA_R, sa_r), (T.BP_SA_K, sa_k), (T.BP_SW_K, sw_k), (T.BP_SW_C, sw_c),
        (T.BP_SA2_R, sa2_r), (T.BP_SA2_K, sa2_k), (T.BP_SW2_K, sw2_k), (T.BP_SW2_C, sw2_c),
        (T.BP_SO_R, out.stride(0)), (T.BP_SO_C, out.stride(1)),
    )  # fmt: skip
    return (a, w, a2, w2, v, out), row


def _run_backward(problems: list, has_a2: bool, has_v: bool, shift: int):
    """``problems``: :func:`_bwd_problem` results. Classed by layout and alignment like
    :func:`_run_forward` (one launch per class). ``shift``: the kernel's ``SHIFT`` (1: samples
    are the rows R, ``cross_backward``; 2: samples are K, ``gram_backward``)."""
    classes: dict = {}
    for tensors, r in problems:
        a_pairs, w_pairs = [(r[T.BP_SA_R], r[T.BP_SA_K])], [(r[T.BP_SW_K], r[T.BP_SW_C])]
        if has_a2:
            a_pairs.append((r[T.BP_SA2_R], r[T.BP_SA2_K]))
            w_pairs.append((r[T.BP_SW2_K], r[T.BP_SW2_C]))
        o_pairs = [(r[T.BP_SO_R], r[T.BP_SO_C])]
        lay = (_plan.layout(a_pairs), _plan.layout(w_pairs), _plan.layout(o_pairs))
        align = _plan.aligned(
            (r[T.BP_R], r[T.BP_C], r[T.BP_K], r[T.BP_K2]),
            _plan.used_strides(a_pairs, lay[0]),
            _plan.used_strides(w_pairs, lay[1]),
            _plan.used_strides(o_pairs, lay[2]),
        ) and all(_plan.ptr_aligned(t) for t in tensors)
        classes.setdefault((*lay, align), []).append((tensors, r))
    for (a_lay, w_lay, o_lay, align), group in classes.items():
        _launch_backward(group, has_a2, has_v, a_lay, w_lay, o_lay, align, shift)


def _launch_backward(problems, has_a2, has_v, a_lay, w_lay, o_lay, align, shift):
    tensors = [t for t, _r in problems]
    a0, w0, a20, w20, v0, out0 = tensors[0]
    a20, w20 = (a20, w20) if has_a2 else (a0, w0)
    v0 = v0 if has_v else w0
    device = out0.device
    wide = a0.dtype == torch.float32 or a20.dtype == torch.float32
    plan = _plan.backward_plan(tuple(r for _t, r in problems), wide, device)
    if plan.n_tiles == 0:
        return
    none = [0] * len(tensors)
    col = lambda i, base: _plan.offsets([t[i] for t in tensors], base)  # noqa: E731
    cols = zip(
        col(0, a0), col(1, w0), col(2, a20) if has_a2 else none, col(3, w20) if has_a2 else none,
        col(4, v0) if has_v else none, col(5, out0),
    )  # fmt: skip
    rows = [
        T.pack(T.BQ_WIDTH, (T.BQ_A, a), (T.BQ_W, w), (T.BQ_A2, a2), (T.BQ_W2, w2), (T.BQ_V, v), (T.BQ_OUT, o))
        for a, w, a2, w2, v, o in cols
    ]
    ptrs = _plan.device_table(rows, device, T.BQ_WIDTH)
    upcast, prec = _plan.flags(a0.dtype, a20.dtype)
    upcast = upcast or (_plan.interpreting() and a0.dtype == torch.bfloat16)
    # W is rounded to the activation dtype for the tensor-core dot only when A and A2 share it
    round_w = a0.dtype == a20.dtype and a0.dtype in _LOW
    with _launch_ctx(device):
        _bwd.backward_kernel[(plan.n_tiles,)](
            a0, w0, a20, w20, v0, out0, plan.prob, ptrs, plan.tiles,
            BM=plan.bm, BN=plan.bn, BK=plan.bk, HAS_A2=has_a2, HAS_V=has_v,
            A_LAYOUT=a_lay, W_LAYOUT=w_lay, O_LAYOUT=o_lay, ALIGN=align, SHIFT=shift,
            SCALE=round_w and a0.dtype == torch.float16, ROUND_W=round_w, UPCAST=upcast, PREC=prec,
            RNE_FIX=_plan.interpreting(),
            num_warps=plan.warps, num_stages=plan.stages,
        )  # fmt: skip


# --------------------------------------------------------------------------- the contract
def _check(x: Tensor, device: Optional[torch.device] = None):
    if x.dim() != 2:
        raise ValueError(f"triton backend: expected a 2-D activation, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"triton backend: all tensors of a call must be on one device ({device}, {x.device})")


def gram(xs: list[Tensor]) -> list[Tensor]:
    out: list = [None] * len(xs)
    for x in xs:
        _check(x, xs[0].device)
    for dt, idx in group_by([x.dtype if x.dtype in _SUPPORTED else None for x in xs]).items():
        if dt is None:
            for i, r in zip(idx, _ref.gram([xs[i] for i in idx])):
                out[i] = r
            continue
        problems = []
        for i in idx:
            x = xs[i]
            n, p = x.shape
            o = torch.empty((n, n), dtype=torch.float32, device=x.device)
            out[i] = o
            # x' x'ᵀ = Aᵀ B with A = B = xᵀ (K = p, M = N = n; shifted along M/N)
            problems.append(_fwd_problem(x, x, o, None, p, n, n, x.stride(1), x.stride(0), x.stride(1), x.stride(0), True))
        _run_forward(problems, shift=1)
    return out


def gram_backward(ms: list[Tensor], xs: list[Tensor]) -> list[Tensor]:
    out: list = [None] * len(xs)
    for dt, idx in group_by([x.dtype if x.dtype in _SUPPORTED else None for x in xs]).items():
        if dt is None:
            for i, r in zip(idx, _ref.gram_backward([ms[i] for i in idx], [xs[i] for i in idx])):
                out[i] = r
            continue
        problems = []
        for i in idx:
            x, m = xs[i], ms[i].to(torch.float32)
            _check(x, xs[0].device)
            _check(m, x.device)
            n, p = x.shape
            dx = torch.empty((n, p), dtype=x.dtype, device=x.device)
            out[i] = dx
            # (m x')ᵀ = x'ᵀ mᵀ: A = xᵀ (p x n, shifted along K = n), W = mᵀ, out = dxᵀ
            problems.append(_bwd_problem(x, m, None, None, None, dx.T, p, n, n, 0,
                                         x.stride(1), x.stride(0), m.stride(1), m.stride(0)))
        _run_backward(problems, has_a2=False, has_v=False, shift=2)
    return out


def _pair_key(x: Tensor, y: Tensor):
    if x.dtype in _SUPPORTED and y.dtype in _SUPPORTED:
        return (x.dtype, y.dtype)
    return None


def cross(xs: list[Tensor], ys: list[Tensor]):
    k = len(xs)
    res = [[None] * k for _ in range(5)]
    ref_idx = []
    by_dtype: dict = {}
    for i, (x, y) in enumerate(zip(xs, ys)):
        _check(x, xs[0].device)
        _check(y, xs[0].device)
        key = _pair_key(x, y)
        if key is None:
            ref_idx.append(i)
            continue
        n, p = x.shape
        q = y.shape[1]
        f32 = dict(dtype=torch.float32, device=x.device)
        a, b, c = torch.empty((p, p), **f32), torch.empty((q, q), **f32), torch.empty((p, q), **f32)
        sx, sy = torch.empty((p,), **f32), torch.empty((q,), **f32)
        for lst, v in zip(res, (a, b, c, sx, sy)):
            lst[i] = v
        # A'ᵀ B' with A, B in {x, y}, K = n rows (shifted along K)
        by_dtype.setdefault((x.dtype, x.dtype), []).append(
            _fwd_problem(x, x, a, sx, n, p, p, x.stride(0), x.stride(1), x.stride(0), x.stride(1), True))
        by_dtype.setdefault((y.dtype, y.dtype), []).append(
            _fwd_problem(y, y, b, sy, n, q, q, y.stride(0), y.stride(1), y.stride(0), y.stride(1), True))
        by_dtype.setdefault((x.dtype, y.dtype), []).append(
            _fwd_problem(x, y, c, None, n, p, q, x.stride(0), x.stride(1), y.stride(0), y.stride(1), False))
    for problems in by_dtype.values():
        _run_forward(problems, shift=2)
    if ref_idx:
        got = _ref.cross([xs[i] for i in ref_idx], [ys[i] for i in ref_idx])
        for lst, vals in zip(res, got):
            for i, v in zip(ref_idx, vals):
                lst[i] = v
    return tuple(res)


def cross_backward(xs, ms, ys, ns, vs) -> list[Tensor]:
    out: list = [None] * len(xs)
    for key, idx in group_by([_pair_key(x, y) for x, y in zip(xs, ys)]).items():
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        if key is None:
            for i, r in zip(idx, _ref.cross_backward(pick(xs), pick(ms), pick(ys), pick(ns), pick(vs))):
                out[i] = r
            continue
        problems = []
        for i in idx:
            x, y = xs[i], ys[i]
            _check(x, xs[0].device)
            _check(y, xs[0].device)
            m, nn_ = ms[i].to(torch.float32), ns[i].to(torch.float32)
            v = vs[i].to(torch.float32).contiguous()
            n, p = x.shape
            q = y.shape[1]
            dx = torch.empty((n, p), dtype=x.dtype, device=x.device)
            out[i] = dx
            problems.append(_bwd_problem(x, m, y, nn_, v, dx, n, p, p, q,
                                         x.stride(0), x.stride(1), m.stride(0), m.stride(1),
                                         y.stride(0), y.stride(1), nn_.stride(0), nn_.stride(1)))
        _run_backward(problems, has_a2=True, has_v=True, shift=1)
    return out


def gram_stats(k: Tensor, l: Tensor) -> Tensor:
    """(P, n, n) centered Grams -> (P, 5) fp64 CKA statistics: one ``stats_kernel`` launch for
    every pair, plus one sum over its fixed number of partials (deterministic)."""
    if k.dtype != torch.float32 or l.dtype != torch.float32:
        return metrics.gram_stats(k, l)
    k, l = k.contiguous(), l.contiguous()
    P, n = k.shape[0], k.shape[-1]
    nn_ = n * n
    block = 1024 if k.device.type == "cuda" else 256
    nb = max(1, min(-(-nn_ // block), 64 if k.device.type == "cuda" else 4))
    part = torch.empty((P, nb, int(T.S_WIDTH)), dtype=torch.float64, device=k.device)
    if P and nn_:
        with _launch_ctx(k.device):
            _stats.stats_kernel[(P, nb)](k, l, part, nn_, n + 1, BLOCK=block, num_warps=4)
    else:
        part.zero_()
    return part.sum(1)


register_backend(
    Backend(
        name="triton",
        gram=gram,
        gram_backward=gram_backward,
        cross=cross,
        cross_backward=cross_backward,
        available=available,
        gram_stats=gram_stats,
        priority={"cuda": 10},
    )
)
