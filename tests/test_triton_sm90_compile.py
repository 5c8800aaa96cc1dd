"""The Triton kernels compiled for sm_90 without a GPU: the interpreter cannot check what the
compiler does with them (tensor-core MMAs, asynchronous 16-byte loads, shared memory), so this
compiles the production configurations and reads the PTX. With ``test_op_*.py`` (interpreter)
it is the only check of kernel code until a GPU is lent."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


_COMPILE_SCRIPT = r"""
import collections, json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from guidance_kernels.backends import triton_plan as tp
from guidance_kernels.kernels import triton_backward as B, triton_forward as F

tp._SM_COUNT[0] = 132
cuda = torch.device("cuda", 0)
target = GPUTarget("cuda", 90, 32)
out = {}

def build(fn, sig, consts, warps, stages, name):
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                       options=dict(num_warps=warps, num_stages=stages))
    ptx = k.asm["ptx"]
    out[name] = dict(shared=k.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                     cp_async16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)),
                     scalar16=ptx.count("ld.global.b16"))

ptr = lambda names, t: {n: t for n in names}
for dt, wide in [("bf16", False)]:
    block, bk, _t, _c, warps, stages = tp.forward_cfg(256, wide, cuda)
    sig = {**ptr(["a_base", "b_base"], "*" + dt), **ptr(["out_base", "cs_base", "ws_ptr"], "*fp32"),
           **ptr(["prob_ptr", "ptr_ptr", "tile_ptr", "item_ptr"], "*i64")}
    for name, la, lb, shift in [("gram", 2, 1, 1), ("cross", 1, 2, 2)]:
        c = dict(BM=block, BN=block, BK=bk, UPCAST=False, PREC="tf32", A_LAYOUT=la, B_LAYOUT=lb, ALIGN=True,
                 SHIFT=shift)
        build(F.forward_kernel, {**sig, **ptr(c, "constexpr")}, c, warps, stages, f"forward_{name}_{dt}")
    bm, bn, bk, warps, stages = tp.backward_cfg(256, wide, cuda)
    sig = {**ptr(["a_base", "a2_base", "out_base"], "*" + dt), **ptr(["w_base", "w2_base", "v_base"], "*fp32"),
           **ptr(["prob_ptr", "ptr_ptr", "tile_ptr"], "*i64")}
    for name, a2, lay, shift in [("gram_backward", False, 1, 2), ("cross_backward", True, 2, 1)]:
        c = dict(BM=bm, BN=bn, BK=bk, HAS_A2=a2, HAS_V=a2, SCALE=False, ROUND_W=True, UPCAST=False,
                 PREC="tf32", RNE_FIX=False, A_LAYOUT=lay, W_LAYOUT=lay, O_LAYOUT=lay, ALIGN=True,
                 SHIFT=shift)
        build(B.backward_kernel, {**sig, **ptr(c, "constexpr")}, c, warps, stages, f"backward_{name}_{dt}")
from guidance_kernels.kernels import triton_stats as S
build(S.stats_kernel, {"K": "*fp32", "L": "*fp32", "OUT": "*fp64", "NN": "i64", "N1": "i64", "BLOCK": "constexpr"},
      {"BLOCK": 1024}, 4, 1, "stats")
print("RESULT" + json.dumps(out))
"""


def test_kernels_compile_for_hopper():
    """No GPU needed: compile the production configurations (bf16, aligned contiguous fast path)
    for sm_90 and check what the interpreter cannot: they compile, use wgmma tensor-core MMAs,
    16-byte asynchronous loads (cp.async, i.e. the layout/alignment hints work), no scalar
    2-byte loads, and fit in shared memory."""
    import json
    import os
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert set(res) == {
        "forward_gram_bf16", "forward_cross_bf16", "backward_gram_backward_bf16", "backward_cross_backward_bf16", "stats"
    }
    assert res.pop("stats")["shared"] <= 48 * 1024  # the CKA statistics kernel: compiles, small
    for name, m in res.items():
        assert m["wgmma"] > 0 and m["cp_async16"] > 0 and m["scalar16"] == 0, (name, m)
        assert m["shared"] <= 160 * 1024, (name, m)
