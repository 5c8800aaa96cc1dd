"""Work-list planner of the Triton backend (:mod:`.triton`): launch tuning, the work lists
(descriptor tables, :mod:`guidance_kernels.kernels.tables`) built from shapes only and cached
per shape signature, the device copies of those tables (pinned, asynchronous; kept alive for
CUDA graphs), and the compile-time layout / alignment classes of a launch.

Plans are built once per shape signature and copied synchronously then; the only per-call
host->device traffic is the small pointer table, copied from pinned memory with
``non_blocking=True`` (no host sync). Tuning (block sizes, split-K target) is a small heuristic;
tests override it with :func:`tuning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch
from torch import Tensor

from guidance_kernels.kernels import tables as T


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- tuning
@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters; ``None`` fields are chosen by the heuristic in :func:`forward_cfg` /
    :func:`backward_cfg`."""

    fwd_block: Optional[int] = None  # BM = BN of the forward tiles
    fwd_bk: Optional[int] = None
    min_chunk: Optional[int] = None  # smallest K range of one split-K program (elements)
    target_items: Optional[int] = None  # programs to aim for in the forward launch
    bwd_bm: Optional[int] = None
    bwd_bn: Optional[int] = None
    bwd_bk: Optional[int] = None
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


def forward_cfg(max_mn: int, wide: bool, device: torch.device):
    """``(block, bk, target programs, min split-K chunk, warps, stages)`` of a forward launch."""
    t = _TUNING
    if device.type != "cuda":  # interpreter: few, small programs
        block = t.fwd_block or max(16, min(32, _pow2(max_mn)))
        bk = t.fwd_bk or 32
        return block, bk, t.target_items or 8, t.min_chunk or 128, 4, 1
    block = t.fwd_block or (128 if max_mn >= 128 else 64)
    bk = t.fwd_bk or (32 if wide else 64)
    warps = t.num_warps or (8 if block >= 128 else 4)
    stages = t.num_stages or 3
    return block, bk, t.target_items or 4 * _sm_count(device), t.min_chunk or 1024, warps, stages


def backward_cfg(max_c: int, wide: bool, device: torch.device):
    """``(bm, bn, bk, warps, stages)`` of a backward launch."""
    t = _TUNING
    if device.type != "cuda":
        bn = t.bwd_bn or max(16, min(64, _pow2(max_c)))
        return t.bwd_bm or 32, bn, t.bwd_bk or 32, 4, 1
    bn = t.bwd_bn or max(16, min(128, _pow2(max_c)))
    bm = t.bwd_bm or 128
    bk = t.bwd_bk or 32  # 128x32 A + 32x128 fp32 W tiles, 3 stages: 64 KiB shared memory
    return bm, bn, bk, t.num_warps or 8, t.num_stages or 3


# --------------------------------------------------------------------------- device tables
def offsets(tensors: list[Tensor], base: Tensor) -> list[int]:
    """Element offsets of ``tensors``' data from ``base``'s (one storage dtype)."""
    b, size = base.data_ptr(), base.element_size()
    out = []
    for t in tensors:
        d = t.data_ptr() - b
        if d % size:  # cannot happen for torch allocations; keep it loud if it ever does
            raise RuntimeError("triton backend: tensor is not aligned to its element size")
        out.append(d // size)
    return out


# host buffers of tables copied during CUDA-graph capture (see device_table)
_CAPTURED_TABLES: dict = {}


def device_table(rows: list, device: torch.device, width: int, cached: bool = False) -> Tensor:
    """int64 table on ``device``. Per-call tables go without a device sync: a pageable
    host->device copy synchronizes, so they go through pinned memory, ``non_blocking`` (the
    caching host allocator keeps the pinned block until the copy is done). ``cached`` tables
    (plans, reused across calls and possibly across streams) are copied synchronously, once per
    shape signature, so that they are on the device before any stream reads them (build plans
    in a warm-up call before CUDA-graph capture: a synchronous copy cannot be captured)."""
    width = int(width)
    t = torch.tensor([list(r) for r in rows], dtype=torch.int64).reshape(len(rows), width)
    if device.type == "cuda" and not cached:
        pinned = t.pin_memory()
        if torch.cuda.is_current_stream_capturing():
            # A CUDA graph replays the copy from this very host buffer: keep it, unchanged,
            # for the life of the process (one per distinct table; pointers are static in a graph).
            pinned = _CAPTURED_TABLES.setdefault((tuple(map(tuple, rows)), width), pinned)
        return pinned.to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------- launch classes
def flags(da: torch.dtype, db: torch.dtype):
    """(UPCAST, PREC): bf16 dot is broken under the interpreter and mixed dtypes cannot be
    dotted, so those go through fp32; fp32 operands use exact fp32 math ("ieee", not tf32)."""
    upcast = da != db or (interpreting() and torch.bfloat16 in (da, db))
    prec = "ieee" if (upcast or da == torch.float32) else "tf32"
    return upcast, prec


def layout(pairs) -> int:
    """Compile-time layout of one operand over all problems of a launch, from its
    ``(stride_dim0, stride_dim1)`` pairs: 1 if every dim-0 stride is 1, 2 if every dim-1 stride
    is 1, else 0 (see ``triton_util.tile_offsets``)."""
    pairs = list(pairs)
    if all(s1 == 1 for _s0, s1 in pairs):
        return 2
    if all(s0 == 1 for s0, _s1 in pairs):
        return 1
    return 0


def used_strides(pairs, lay: int):
    """The strides of ``pairs`` that a launch of layout ``lay`` reads (not the unit ones)."""
    for s0, s1 in pairs:
        if lay != 1:
            yield s0
        if lay != 2:
            yield s1


def aligned(*groups) -> bool:
    """True when every value of every iterable is a multiple of 8 (elements)."""
    return all(v % 8 == 0 for g in groups for v in g)


def ptr_aligned(t: Optional[Tensor]) -> bool:
    return t is None or t.data_ptr() % (8 * t.element_size()) == 0


# --------------------------------------------------------------------------- plans
@dataclasses.dataclass
class ForwardPlan:
    """Work list of one forward launch: problem, tile, item and finalize tables (device)."""

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


@dataclasses.dataclass
class BackwardPlan:
    """Work list of one backward launch: problem and tile tables (device)."""

    prob: Tensor
    tiles: Tensor
    n_tiles: int
    bm: int
    bn: int
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


def forward_plan(static: tuple, wide: bool, device: torch.device) -> ForwardPlan:
    """``static``: one problem row (``FP_*`` fields) per product of the launch."""
    key = ("forward", static, wide, device, _TUNING)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    max_mn = max(max(r[T.FP_M], r[T.FP_N]) for r in static)
    block, bk, target, min_chunk, warps, stages = forward_cfg(max_mn, wide, device)
    tiles_of = []
    for r in static:
        tm, tn = -(-r[T.FP_M] // block), -(-r[T.FP_N] // block)
        if r[T.FP_SYM]:
            tiles_of.append([(i, j) for i in range(tm) for j in range(i, tn)])
        else:
            tiles_of.append([(i, j) for i in range(tm) for j in range(tn)])
    n_tiles = sum(len(t) for t in tiles_of)
    kblocks = [max(1, -(-r[T.FP_K] // bk)) for r in static]
    work = sum(len(t) * kb for t, kb in zip(tiles_of, kblocks))
    chunk = max(-(-min_chunk // bk), -(-work // max(target, n_tiles, 1)))  # in BK blocks
    tiles, items, fin, ws = [], [], [], 0
    for p, (r, tl_, kb) in enumerate(zip(static, tiles_of, kblocks)):
        splits = -(-kb // chunk)
        first = len(tiles)
        for i, j in tl_:
            if splits == 1:
                tiles.append(T.pack(T.FT_WIDTH, (T.FT_PROB, p), (T.FT_I, i), (T.FT_J, j), (T.FT_WS, -1)))
            else:
                fin.append(len(tiles))
                tiles.append(T.pack(T.FT_WIDTH, (T.FT_PROB, p), (T.FT_I, i), (T.FT_J, j), (T.FT_WS, ws)))
                ws += block * block + (block if (r[T.FP_CS] and i == j) else 0)
        K = r[T.FP_K]
        for s in range(splits):  # K chunk outer, tile inner: programs sharing data run together
            k0, k1 = s * chunk * bk, min(K, (s + 1) * chunk * bk)
            for t in range(first, len(tiles)):
                items.append(T.pack(T.FI_WIDTH, (T.FI_TILE, t), (T.FI_K0, k0), (T.FI_K1, k1)))
    plan = ForwardPlan(
        prob=device_table(static, device, T.FP_WIDTH, cached=True),
        tiles=device_table(tiles, device, T.FT_WIDTH, cached=True),
        items=device_table(items, device, T.FI_WIDTH, cached=True),
        fin=device_table([[t] for t in fin], device, 1, cached=True) if fin else None,
        ws_size=ws,
        n_items=len(items),
        n_fin=len(fin),
        block=block,
        bk=bk,
        warps=warps,
        stages=stages,
    )
    return _cache_put(key, plan)


def backward_plan(static: tuple, wide: bool, device: torch.device) -> BackwardPlan:
    """``static``: one problem row (``BP_*`` fields) per product of the launch."""
    key = ("backward", static, wide, device, _TUNING)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    max_c = max(r[T.BP_C] for r in static)
    bm, bn, bk, warps, stages = backward_cfg(max_c, wide, device)
    tiles = []
    for p, r in enumerate(static):
        tr, tc = -(-r[T.BP_R] // bm), -(-r[T.BP_C] // bn)
        tiles += [  # column tiles adjacent
            T.pack(T.BT_WIDTH, (T.BT_PROB, p), (T.BT_R, i), (T.BT_C, j)) for i in range(tr) for j in range(tc)
        ]
    plan = BackwardPlan(
        prob=device_table(static, device, T.BP_WIDTH, cached=True),
        tiles=device_table(tiles, device, T.BT_WIDTH, cached=True),
        n_tiles=len(tiles),
        bm=bm,
        bn=bn,
        bk=bk,
        warps=warps,
        stages=stages,
    )
    return _cache_put(key, plan)
