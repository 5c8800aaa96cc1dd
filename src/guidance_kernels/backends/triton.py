"""Triton backend: every layer's products in one grouped launch (see :mod:`..backends`).

Launches per call (independent of the number of layers / pairs):

* ``gram`` / ``cross``: one ``atb_kernel`` launch per dtype combination present (normally one),
  plus, when some problem's K dimension is split across programs, one workspace memset and one
  ``finalize_kernel`` launch. A work list of ``(tile, k0, k1)`` items is built on the host from
  shapes only and cached by shape signature.
* ``gram_backward`` / ``cross_backward``: one ``aw_kernel`` launch per dtype combination.

The host never syncs with the device in steady state: the only per-call host->device traffic is
a small table of data-pointer offsets, copied from pinned memory with ``non_blocking=True``.
Plans (work lists) are built once per shape signature and copied synchronously then.

Every product is of the row-shifted activation ``x' = x - 1 x[0]`` (the backend contract): the
kernels subtract the first sample as they load (``SHIFT``, see ``kernels/triton_atb.py``).

fp64 inputs (used for verification only) are delegated to the reference backend.
Tuning (block sizes, split-K target) is chosen by a small heuristic; tests override it with
:func:`tuning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Optional

import torch
from torch import Tensor

from guidance_kernels.backends import Backend, register_backend
from guidance_kernels.backends import reference as _ref
from guidance_kernels.planning import group_by

try:
    import triton

    from guidance_kernels.kernels import triton_atb as _atb
    from guidance_kernels.kernels import triton_aw as _aw
    from guidance_kernels.kernels import triton_stats as _stats

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({e})"

_LOW = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_atb.atb_kernel, InterpretedFunction)


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
        if _interpreting() and _INTERPRETED:
            return None
        return (
            "Triton kernels run on CUDA; CPU tensors need TRITON_INTERPRET=1 set before "
            "guidance_kernels.backends.triton is imported"
        )
    return f"the triton backend does not support device type {device.type!r}"


# --------------------------------------------------------------------------- tuning
@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters; ``None`` fields are chosen by the heuristic in :func:`_atb_cfg` /
    :func:`_aw_cfg`."""

    atb_block: Optional[int] = None  # BM = BN of the forward tiles
    atb_bk: Optional[int] = None
    min_chunk: Optional[int] = None  # smallest K range of one split-K program (elements)
    target_items: Optional[int] = None  # programs to aim for in the forward launch
    aw_bm: Optional[int] = None
    aw_bn: Optional[int] = None
    aw_bk: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None


_TUNING = Tuning()


@contextlib.contextmanager
def tuning(**kwargs):
    """Temporarily override launch parameters (tests use it to force several tiles and
    split-K on tiny shapes)."""
    global _TUNING
    old = _TUNING
    _TUNING = dataclasses.replace(old, **kwargs)
    try:
        yield _TUNING
    finally:
        _TUNING = old


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _atb_cfg(max_mn: int, wide: bool, device: torch.device):
    t = _TUNING
    if device.type != "cuda":  # interpreter: few, small programs
        block = t.atb_block or max(16, min(32, _pow2(max_mn)))
        bk = t.atb_bk or 32
        return block, bk, t.target_items or 8, t.min_chunk or 128, 4, 1
    block = t.atb_block or (128 if max_mn >= 128 else 64)
    bk = t.atb_bk or (32 if wide else 64)
    warps = t.num_warps or (8 if block >= 128 else 4)
    stages = t.num_stages or 3
    return block, bk, t.target_items or 4 * _sm_count(device), t.min_chunk or 1024, warps, stages


def _aw_cfg(max_c: int, wide: bool, device: torch.device):
    t = _TUNING
    if device.type != "cuda":
        bn = t.aw_bn or max(16, min(64, _pow2(max_c)))
        return t.aw_bm or 32, bn, t.aw_bk or 32, 4, 1
    bn = t.aw_bn or max(16, min(128, _pow2(max_c)))
    bm = t.aw_bm or 128
    bk = t.aw_bk or 32  # 128x32 A + 32x128 fp32 W tiles, 3 stages: 64 KiB shared memory
    return bm, bn, bk, t.num_warps or 8, t.num_stages or 3


# --------------------------------------------------------------------------- helpers
def _offsets(tensors: list[Tensor], base: Tensor) -> list[int]:
    b, size = base.data_ptr(), base.element_size()
    out = []
    for t in tensors:
        d = t.data_ptr() - b
        if d % size:  # cannot happen for torch allocations; keep it loud if it ever does
            raise RuntimeError("triton backend: tensor is not aligned to its element size")
        out.append(d // size)
    return out


def _device_table(rows: list[list[int]], device: torch.device, width: int, cached: bool = False) -> Tensor:
    """int64 table on ``device``. Per-call tables go without a device sync: a pageable
    host->device copy synchronizes, so they go through pinned memory, ``non_blocking`` (the
    caching host allocator keeps the pinned block until the copy is done). ``cached`` tables
    (plans, reused across calls and possibly across streams) are copied synchronously, once per
    shape signature, so that they are on the device before any stream reads them (build plans
    in a warm-up call before CUDA-graph capture: a synchronous copy cannot be captured)."""
    t = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
    if device.type == "cuda" and not cached:
        pinned = t.pin_memory()
        if torch.cuda.is_current_stream_capturing():
            # A CUDA graph replays the copy from this very host buffer: keep it, unchanged,
            # for the life of the process (one per distinct table; pointers are static in a graph).
            pinned = _CAPTURED_TABLES.setdefault((tuple(map(tuple, rows)), width), pinned)
        return pinned.to(device, non_blocking=True)
    return t.to(device)


# host buffers of tables copied during CUDA-graph capture (see _device_table)
_CAPTURED_TABLES: dict = {}


def _flags(da: torch.dtype, db: torch.dtype):
    """(UPCAST, PREC): bf16 dot is broken under the interpreter and mixed dtypes cannot be
    dotted, so those go through fp32; fp32 operands use exact fp32 math ("ieee", not tf32)."""
    upcast = da != db or (_interpreting() and torch.bfloat16 in (da, db))
    prec = "ieee" if (upcast or da == torch.float32) else "tf32"
    return upcast, prec


def _layout(pairs) -> int:
    """Compile-time layout of one operand over all problems of a launch, from its
    ``(stride_dim0, stride_dim1)`` pairs: 1 if every dim-0 stride is 1, 2 if every dim-1 stride
    is 1, else 0 (see ``triton_util.tile_offsets``)."""
    pairs = list(pairs)
    if all(s1 == 1 for _s0, s1 in pairs):
        return 2
    if all(s0 == 1 for s0, _s1 in pairs):
        return 1
    return 0


def _used_strides(pairs, layout: int):
    for s0, s1 in pairs:
        if layout != 1:
            yield s0
        if layout != 2:
            yield s1


def _aligned(*groups) -> bool:
    """True when every value of every iterable is a multiple of 8 (elements)."""
    return all(v % 8 == 0 for g in groups for v in g)


# compile-time flags of the latest launch of each kernel (the tests check the fast paths ran)
LAST_FLAGS: dict = {}


def _launch_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- forward: Aᵀ B
@dataclasses.dataclass
class _AtbPlan:
    prob: Tensor
    tiles: Tensor
    items: Tensor
    fin: Optional[Tensor]
    ws_size: int
    n_items: int
    n_fin: int
    block: int
    bk: int
    warps: int
    stages: int


_PLANS: dict = {}
_PLAN_CACHE_MAX = 256


def _cache_put(key, value):
    if len(_PLANS) >= _PLAN_CACHE_MAX:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = value
    return value


def _atb_plan(static: tuple, wide: bool, device: torch.device) -> _AtbPlan:
    """``static``: one row of problem fields (see ``triton_atb``) per problem."""
    key = ("atb", static, wide, device, _TUNING)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    max_mn = max(max(r[_atb.P_M], r[_atb.P_N]) for r in static)
    block, bk, target, min_chunk, warps, stages = _atb_cfg(max_mn, wide, device)
    tiles_of = []
    for r in static:
        tm, tn = -(-r[_atb.P_M] // block), -(-r[_atb.P_N] // block)
        if r[_atb.P_SYM]:
            tiles_of.append([(i, j) for i in range(tm) for j in range(i, tn)])
        else:
            tiles_of.append([(i, j) for i in range(tm) for j in range(tn)])
    n_tiles = sum(len(t) for t in tiles_of)
    kblocks = [max(1, -(-r[_atb.P_K] // bk)) for r in static]
    work = sum(len(t) * kb for t, kb in zip(tiles_of, kblocks))
    chunk = max(-(-min_chunk // bk), -(-work // max(target, n_tiles, 1)))  # in BK blocks
    tiles, items, fin, ws = [], [], [], 0
    for p, (r, tl_, kb) in enumerate(zip(static, tiles_of, kblocks)):
        splits = -(-kb // chunk)
        first = len(tiles)
        for i, j in tl_:
            if splits == 1:
                tiles.append([p, i, j, -1])
            else:
                fin.append(len(tiles))
                tiles.append([p, i, j, ws])
                ws += block * block + (block if (r[_atb.P_CS] and i == j) else 0)
        K = r[_atb.P_K]
        for s in range(splits):  # K chunk outer, tile inner: programs sharing data run together
            k0, k1 = s * chunk * bk, min(K, (s + 1) * chunk * bk)
            for t in range(first, len(tiles)):
                items.append([t, k0, k1])
    plan = _AtbPlan(
        prob=_device_table([list(r) for r in static], device, _atb._PF, cached=True),
        tiles=_device_table(tiles, device, _atb._TF, cached=True),
        items=_device_table(items, device, _atb._IF, cached=True),
        fin=_device_table([[t] for t in fin], device, 1, cached=True) if fin else None,
        ws_size=ws,
        n_items=len(items),
        n_fin=len(fin),
        block=block,
        bk=bk,
        warps=warps,
        stages=stages,
    )
    return _cache_put(key, plan)


def _ptr_aligned(t: Optional[Tensor]) -> bool:
    return t is None or t.data_ptr() % (8 * t.element_size()) == 0


def _run_atb(problems: list[tuple], shift: int):
    """problems: ``(a, b, K, M, N, sa_k, sa_m, sb_k, sb_n, out, sym, cs)`` where ``a``/``b`` are
    the tensors whose storage A/B index (all ``a`` of one dtype, all ``b`` of one dtype),
    ``out`` an fp32 ``(M, N)`` tensor and ``cs`` an fp32 ``(M,)`` tensor or ``None``;
    ``shift``: the kernel's ``SHIFT`` (1: samples are M/N, the gram view; 2: samples are K).

    Problems are classed by memory layout and alignment (one launch per class: normally one);
    a class whose unit strides and multiple-of-8 sizes/pointers are known at compile time gets
    vectorized, asynchronous (cp.async) loads on the GPU, the general class scalar loads."""
    classes: dict = {}
    for pr in problems:
        a, b, K, M, N, sak, sam, sbk, sbn = pr[:9]
        a_lay, b_lay = _layout([(sam, sak)]), _layout([(sbk, sbn)])  # A tile is (M x K)
        align = (
            _aligned((K, M, N), _used_strides([(sam, sak)], a_lay), _used_strides([(sbk, sbn)], b_lay))
            and _ptr_aligned(a)
            and _ptr_aligned(b)
        )
        classes.setdefault((a_lay, b_lay, align), []).append(pr)
    for (a_lay, b_lay, align), group in classes.items():
        _launch_atb(group, a_lay, b_lay, align, shift)


def _launch_atb(problems: list[tuple], a_lay: int, b_lay: int, align: bool, shift: int):
    a0, b0, out0 = problems[0][0], problems[0][1], problems[0][9]
    device = out0.device
    static = tuple(
        (K, M, N, sak, sam, sbk, sbn, out.stride(0), out.stride(1), int(sym), int(cs is not None))
        for (_a, _b, K, M, N, sak, sam, sbk, sbn, out, sym, cs) in problems
    )
    wide = a0.dtype == torch.float32 or b0.dtype == torch.float32
    plan = _atb_plan(static, wide, device)
    if plan.n_items == 0:  # every output is (0, 0) or (0,)
        return
    css = [pr[11] for pr in problems if pr[11] is not None]
    cs0 = css[0] if css else out0
    a_off = _offsets([pr[0] for pr in problems], a0)
    b_off = _offsets([pr[1] for pr in problems], b0)
    o_off = _offsets([pr[9] for pr in problems], out0)
    c_off = [(_offsets([pr[11]], cs0)[0] if pr[11] is not None else -1) for pr in problems]
    ptrs = _device_table([list(r) for r in zip(a_off, b_off, o_off, c_off)], device, _atb._QF)
    if plan.ws_size:
        ws = torch.zeros(plan.ws_size, dtype=torch.float32, device=device)
    else:
        ws = out0  # never touched
    upcast, prec = _flags(a0.dtype, b0.dtype)
    LAST_FLAGS["atb"] = dict(A_LAYOUT=a_lay, B_LAYOUT=b_lay, ALIGN=align, SHIFT=shift, n_fin=plan.n_fin)
    with _launch_ctx(device):
        _atb.atb_kernel[(plan.n_items,)](
            a0, b0, out0, cs0, ws, plan.prob, ptrs, plan.tiles, plan.items,
            BM=plan.block, BN=plan.block, BK=plan.bk, UPCAST=upcast, PREC=prec,
            A_LAYOUT=a_lay, B_LAYOUT=b_lay, ALIGN=align, SHIFT=shift,
            num_warps=plan.warps, num_stages=plan.stages,
        )
        if plan.n_fin:
            _atb.finalize_kernel[(plan.n_fin,)](
                out0, cs0, ws, plan.prob, ptrs, plan.tiles, plan.fin,
                BM=plan.block, BN=plan.block, num_warps=8 if plan.block >= 128 else 4,
            )


# --------------------------------------------------------------------------- backward: A W
@dataclasses.dataclass
class _AwPlan:
    prob: Tensor
    tiles: Tensor
    n_tiles: int
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int


def _aw_plan(static: tuple, wide: bool, device: torch.device) -> _AwPlan:
    key = ("aw", static, wide, device, _TUNING)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    max_c = max(r[_aw.P_C] for r in static)
    bm, bn, bk, warps, stages = _aw_cfg(max_c, wide, device)
    tiles = []
    for p, r in enumerate(static):
        tr, tc = -(-r[_aw.P_R] // bm), -(-r[_aw.P_C] // bn)
        tiles += [[p, i, j] for i in range(tr) for j in range(tc)]  # column tiles adjacent
    plan = _AwPlan(
        prob=_device_table([list(r) for r in static], device, _aw._PF, cached=True),
        tiles=_device_table(tiles, device, _aw._TF, cached=True),
        n_tiles=len(tiles),
        bm=bm,
        bn=bn,
        bk=bk,
        warps=warps,
        stages=stages,
    )
    return _cache_put(key, plan)


def _run_aw(problems: list[tuple], has_a2: bool, has_v: bool, shift: int):
    """problems: ``(a, w, a2, w2, v, out, R, C, K, K2, sa_r, sa_k, sw_k, sw_c, sa2_r, sa2_k,
    sw2_k, sw2_c, so_r, so_c)``; ``w``/``w2``/``v`` fp32, ``a2``/``w2``/``v`` may be None.
    Classed by layout and alignment like :func:`_run_atb` (one launch per class). ``shift``: the
    kernel's ``SHIFT`` (1: samples are the rows R, ``cross_backward``; 2: samples are K)."""
    P = _aw
    classes: dict = {}
    for pr in problems:
        r = tuple(int(v) for v in pr[6:])
        a_pairs, w_pairs = [(r[P.P_SAR], r[P.P_SAK])], [(r[P.P_SWK], r[P.P_SWC])]
        if has_a2:
            a_pairs.append((r[P.P_SA2R], r[P.P_SA2K]))
            w_pairs.append((r[P.P_SW2K], r[P.P_SW2C]))
        o_pairs = [(r[P.P_SOR], r[P.P_SOC])]
        lay = (_layout(a_pairs), _layout(w_pairs), _layout(o_pairs))
        align = _aligned(
            r[: P.P_SAR],
            _used_strides(a_pairs, lay[0]),
            _used_strides(w_pairs, lay[1]),
            _used_strides(o_pairs, lay[2]),
        ) and all(_ptr_aligned(t) for t in pr[:6])
        classes.setdefault((*lay, align), []).append(pr)
    for (a_lay, w_lay, o_lay, align), group in classes.items():
        _launch_aw(group, has_a2, has_v, a_lay, w_lay, o_lay, align, shift)


def _launch_aw(problems, has_a2, has_v, a_lay, w_lay, o_lay, align, shift):
    a0, w0, out0 = problems[0][0], problems[0][1], problems[0][5]
    a20 = problems[0][2] if has_a2 else a0
    w20 = problems[0][3] if has_a2 else w0
    v0 = problems[0][4] if has_v else w0
    device = out0.device
    static = tuple(tuple(int(v) for v in pr[6:]) for pr in problems)
    wide = a0.dtype == torch.float32 or a20.dtype == torch.float32
    plan = _aw_plan(static, wide, device)
    if plan.n_tiles == 0:
        return
    cols = [
        _offsets([pr[0] for pr in problems], a0),
        _offsets([pr[1] for pr in problems], w0),
        _offsets([pr[2] for pr in problems], a20) if has_a2 else [0] * len(problems),
        _offsets([pr[3] for pr in problems], w20) if has_a2 else [0] * len(problems),
        _offsets([pr[4] for pr in problems], v0) if has_v else [0] * len(problems),
        _offsets([pr[5] for pr in problems], out0),
    ]
    ptrs = _device_table([list(r) for r in zip(*cols)], device, _aw._QF)
    upcast, prec = _flags(a0.dtype, a20.dtype)
    upcast = upcast or (_interpreting() and a0.dtype == torch.bfloat16)
    # W is rounded to the activation dtype for the tensor-core dot only when A and A2 share it
    round_w = a0.dtype == a20.dtype and a0.dtype in _LOW
    LAST_FLAGS["aw"] = dict(A_LAYOUT=a_lay, W_LAYOUT=w_lay, O_LAYOUT=o_lay, ALIGN=align, SHIFT=shift)
    with _launch_ctx(device):
        _aw.aw_kernel[(plan.n_tiles,)](
            a0, w0, a20, w20, v0, out0, plan.prob, ptrs, plan.tiles,
            BM=plan.bm, BN=plan.bn, BK=plan.bk, HAS_A2=has_a2, HAS_V=has_v,
            A_LAYOUT=a_lay, W_LAYOUT=w_lay, O_LAYOUT=o_lay, ALIGN=align, SHIFT=shift,
            SCALE=round_w and a0.dtype == torch.float16, ROUND_W=round_w, UPCAST=upcast, PREC=prec,
            RNE_FIX=_interpreting(),
            num_warps=plan.warps, num_stages=plan.stages,
        )


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
            problems.append((x, x, p, n, n, x.stride(1), x.stride(0), x.stride(1), x.stride(0),
                             o, True, None))
        _run_atb(problems, shift=1)
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
            problems.append((x, m, None, None, None, dx, p, n, n, 0,
                             x.stride(1), x.stride(0), m.stride(1), m.stride(0), 0, 0, 0, 0,
                             dx.stride(1), dx.stride(0)))
        _run_aw(problems, has_a2=False, has_v=False, shift=2)
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
            (x, x, n, p, p, x.stride(0), x.stride(1), x.stride(0), x.stride(1), a, True, sx))
        by_dtype.setdefault((y.dtype, y.dtype), []).append(
            (y, y, n, q, q, y.stride(0), y.stride(1), y.stride(0), y.stride(1), b, True, sy))
        by_dtype.setdefault((x.dtype, y.dtype), []).append(
            (x, y, n, p, q, x.stride(0), x.stride(1), y.stride(0), y.stride(1), c, False, None))
    for problems in by_dtype.values():
        _run_atb(problems, shift=2)
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
            problems.append((x, m, y, nn_, v, dx, n, p, p, q,
                             x.stride(0), x.stride(1), m.stride(0), m.stride(1),
                             y.stride(0), y.stride(1), nn_.stride(0), nn_.stride(1),
                             dx.stride(0), dx.stride(1)))
        _run_aw(problems, has_a2=True, has_v=True, shift=1)
    return out


def gram_stats(k: Tensor, l: Tensor) -> Tensor:
    """(P, n, n) centered Grams -> (P, 5) fp64 CKA statistics: one ``stats_kernel`` launch for
    every pair, plus one sum over its fixed number of partials (deterministic)."""
    if k.dtype != torch.float32 or l.dtype != torch.float32:
        return _ref.gram_stats(k, l)
    k, l = k.contiguous(), l.contiguous()
    P, n = k.shape[0], k.shape[-1]
    nn_ = n * n
    block = 1024 if k.device.type == "cuda" else 256
    nb = max(1, min(-(-nn_ // block), 64 if k.device.type == "cuda" else 4))
    part = torch.empty((P, nb, 5), dtype=torch.float64, device=k.device)
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
