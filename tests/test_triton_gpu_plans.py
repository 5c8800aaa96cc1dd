"""The Triton backend's work lists with the *GPU* launch configuration, checked without a GPU.

Under the interpreter the backend plans with tiny tiles (the device is the CPU); the plans the
GPU will run (128x128 tiles, BK 64, ~4 programs per SM, split-K over 1024-element chunks) are
never built on CPU otherwise. Here they are built from shapes only, for the canonical workloads
W1-W5 and for awkward shapes, and their invariants are checked: every (tile, k) pair is covered
exactly once, split tiles and only they own a disjoint workspace slot, symmetric problems cover
every output element exactly once through the upper tiles and their mirrors, the K boundaries
keep the multiple-of-8 alignment the ``ALIGN`` hints promise, and the grid fits.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from guidance_kernels.backends import triton_plan as tp  # noqa: E402
from guidance_kernels.bench.workloads import WORKLOADS  # noqa: E402
from guidance_kernels.kernels import tables as T  # noqa: E402
from guidance_kernels.planning import choose_form  # noqa: E402

CUDA = torch.device("cuda", 0)  # only a key: nothing is allocated on it


@pytest.fixture
def host_plans(monkeypatch):
    """Plans as host lists (no device tables), 132 SMs (H100 SXM), a private plan cache."""
    monkeypatch.setattr(tp, "device_table", lambda rows, device, width, cached=False: [list(r) for r in rows])
    monkeypatch.setattr(tp, "_sm_count", lambda device: 132)
    monkeypatch.setattr(tp, "_PLANS", {})
    monkeypatch.setattr(tp, "_TUNING", tp.Tuning())


def gram_row(n, p):
    # as backends.triton.gram builds it for a contiguous (n, p) activation
    return (p, n, n, 1, p, 1, p, n, 1, 1, 0)


def cross_rows(n, p, q):
    # as backends.triton.cross builds it for contiguous (n, p), (n, q)
    return [
        (n, p, p, p, 1, p, 1, p, 1, 1, 1),
        (n, q, q, q, 1, q, 1, q, 1, 1, 1),
        (n, p, q, p, 1, q, 1, q, 1, 0, 0),
    ]


def check_forward_plan(static, wide):
    plan = tp.forward_plan(tuple(static), wide, CUDA)
    bm = plan.block
    assert bm in (64, 128) and plan.bk in (32, 64)
    assert plan.n_items == len(plan.items) < 2**31
    tiles = plan.tiles
    items_of: dict = {}
    for t, k0, k1 in plan.items:
        items_of.setdefault(t, []).append((k0, k1))
    assert sorted(items_of) == list(range(len(tiles)))  # every tile has work
    slots = []
    for t, (p, ti, tj, ws) in enumerate(tiles):
        K, M, N = static[p][T.FP_K], static[p][T.FP_M], static[p][T.FP_N]
        assert 0 <= ti * bm < M and 0 <= tj * bm < N
        rng = sorted(items_of[t])
        # the K ranges of a tile partition [0, K) (one empty range when K == 0)
        assert rng[0][0] == 0 and rng[-1][1] == K
        for (a0, a1), (b0, _b1) in zip(rng, rng[1:]):
            assert a1 == b0 and a0 < a1
        for k0, k1 in rng:
            assert k0 % plan.bk == 0  # chunk starts on a BK (>= 8) boundary: ALIGN's k0 hint
            assert k1 == K or k1 % plan.bk == 0  # so k1 % 8 == 0 whenever K % 8 == 0
        if len(rng) > 1:
            assert ws >= 0
            size = bm * bm + (bm if (static[p][T.FP_CS] and ti == tj) else 0)
            slots.append((ws, ws + size))
        else:
            assert ws < 0
    slots.sort()
    for (a0, a1), (b0, _b1) in zip(slots, slots[1:]):
        assert a1 <= b0
    if slots:
        assert slots[-1][1] <= plan.ws_size
    assert plan.n_fin == len(slots)
    assert sorted(f[0] for f in (plan.fin or [])) == sorted(
        t for t, r in enumerate(tiles) if r[T.FT_WS] >= 0
    )
    # output coverage: each (problem, tile-row, tile-col) written exactly once (mirrors included)
    for p, r in enumerate(static):
        tm, tn = -(-r[T.FP_M] // bm), -(-r[T.FP_N] // bm)
        seen: dict = {}
        for pp, ti, tj, _ws in tiles:
            if pp != p:
                continue
            seen[(ti, tj)] = seen.get((ti, tj), 0) + 1
            if r[T.FP_SYM] and ti != tj:
                assert ti < tj
                seen[(tj, ti)] = seen.get((tj, ti), 0) + 1
        assert seen == {(i, j): 1 for i in range(tm) for j in range(tn)}
    return plan


def check_backward_plan(static, wide):
    plan = tp.backward_plan(tuple(static), wide, CUDA)
    assert plan.n_tiles == len(plan.tiles) < 2**31
    assert plan.bm >= 16 and plan.bn >= 16 and plan.bk >= 16
    seen = set()
    for p, tr, tc in plan.tiles:
        r = static[p]
        assert tr * plan.bm < r[T.BP_R] and tc * plan.bn < r[T.BP_C]
        seen.add((p, tr, tc))
    want = {
        (p, i, j)
        for p, r in enumerate(static)
        for i in range(-(-r[T.BP_R] // plan.bm))
        for j in range(-(-r[T.BP_C] // plan.bn))
    }
    assert seen == want and len(seen) == len(plan.tiles)
    return plan


@pytest.mark.parametrize("wide", [False, True], ids=["16bit", "fp32"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_gpu_plans_for_canonical_workloads(host_plans, name, wide):
    w = WORKLOADS[name]
    grams, crosses, gbw, cbw = [], [], [], []
    for n, p, q in w.dims():
        if choose_form(n, p, q) == "sample":
            grams += [gram_row(n, p), gram_row(n, q)]
            # gram_backward: A = x^T (p x n), W = m^T (n x n), out = dx^T
            gbw.append((p, n, n, 0, 1, p, 1, n, 0, 0, 0, 0, 1, p))
        else:
            crosses += cross_rows(n, p, q)
            cbw.append((n, p, p, q, p, 1, p, 1, q, 1, p, 1, p, 1))
    if grams:
        check_forward_plan(grams, wide)
        check_backward_plan(gbw, wide)
    if crosses:
        check_forward_plan(crosses, wide)
        check_backward_plan(cbw, wide)


@pytest.mark.parametrize(
    "dims",
    [
        [(256, 200704, 200704)],  # resnet conv1 at batch 256: heavy split-K
        [(7, 5, 3), (1, 1, 1), (300, 9, 1000)],  # n, p below the tile; ragged edges
        [(129, 1000, 17)] * 3,
        [(64, 512, 512)] * 300,  # hundreds of problems in one launch
        [(16384, 1024, 768)],  # token-level, feature form
        [(0, 8, 8), (8, 0, 8), (5, 8, 0)],  # empty sides
    ],
)
@pytest.mark.parametrize("wide", [False, True], ids=["16bit", "fp32"])
def test_gpu_plans_awkward(host_plans, dims, wide):
    grams = [gram_row(n, p) for n, p, _q in dims]
    check_forward_plan(grams, wide)
    # the feature form only where its (p, p) outputs are sane (never chosen for conv1)
    crosses = [r for n, p, q in dims if p * q <= 1 << 24 for r in cross_rows(n, p, q)]
    if crosses:
        check_forward_plan(crosses, wide)
    gbw = [(p, n, n, 0, 1, p, 1, n, 0, 0, 0, 0, 1, p) for n, p, _q in dims]
    check_backward_plan(gbw, wide)
