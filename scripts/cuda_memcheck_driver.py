"""Small driver for ``compute-sanitizer``: every primitive of the CUDA backend
(``gram``, ``gram_backward``, ``cross``, ``cross_backward``) once per dtype on small, awkward
layers, each result checked against an fp64 product of the row-shifted activation.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
        python3 scripts/cuda_memcheck_driver.py
    compute-sanitizer --tool racecheck python3 scripts/cuda_memcheck_driver.py --ops gram

The shapes are small (the sanitizer slows kernels 10-100x) but cover what the tests' awkward
layers cover: odd n and p, n = 1, p = 1, p = 0, n = 0, exactly one 64-tile, just over a tile,
column-strided and row-sliced views (odd row stride, unaligned base), a large common offset
(the 16-bit kernels skip their lo products) and one long layer whose reduction is split
(zero-fill launch + atomics). ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` makes every tensor its own
allocation, so an access past a tensor's end is not hidden inside a pooled block.

Exit codes: 0 all results match, 1 a mismatch, 2 cannot run here (no GPU / no extension).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

# the tests' shared helpers: the row shift, the awkward layers set, the relative error
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from helpers import awkward_layers, sh  # noqa: E402
from helpers import rel_or_abs as rel  # noqa: E402

OPS = ("gram", "gram_backward", "cross", "cross_backward")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# relative Frobenius error vs fp64: fp32 products; outputs rounded to the activation dtype
PROD_TOL = 2e-5
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--long-p", type=int, default=20_000, help="features of the Gram split-K layer")
    ap.add_argument("--long-n", type=int, default=5_000, help="samples of the feature-space split-K layer")
    ap.add_argument("--backend", default="cuda", help="backend to drive (reference/cpu: a self-check of this script)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = args.device

    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        print("cuda_memcheck_driver: no CUDA device; nothing run", file=sys.stderr)
        return 2
    from guidance_kernels.backends import get_backend

    cb = get_backend(args.backend)
    why = cb.available(torch.device(dev))
    if why is not None:
        print(f"cuda_memcheck_driver: backend {args.backend!r} unavailable on {dev}: {why}", file=sys.stderr)
        return 2
    print(f"cuda_memcheck_driver: backend {args.backend!r} on {dev} "
          f"({torch.cuda.get_device_name() if torch.device(dev).type == 'cuda' else 'cpu'})", flush=True)

    bad = 0
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        g = torch.Generator(device=dev).manual_seed(0)
        base = awkward_layers(dtype, g, dev, big=False)
        # Grams: + a long-p layer; feature-space products: + a long-n layer (split-K, atomics)
        xs = base + [torch.randn(24, args.long_p, device=dev, generator=g).to(dtype)]
        fx = base + [torch.randn(args.long_n, 70, device=dev, generator=g).to(dtype)]
        if args.backend != "cuda":  # the reference backend's cross takes n >= 1 only
            fx = [x for x in fx if x.shape[0]]
        # partners for the feature-space products: same n, other feature sizes (q = 0 once)
        qs = [(x.shape[1] * 3) % 50 for x in fx]
        ys = [torch.randn(x.shape[0], q, device=dev, generator=g).to(dtype) for x, q in zip(fx, qs)]
        checks = []  # (op, layer index, error, tolerance)
        if "gram" in args.ops:
            for i, (k, x) in enumerate(zip(cb.gram(xs), xs)):
                checks.append(("gram", i, rel(k, sh(x) @ sh(x).T), PROD_TOL))
        if "gram_backward" in args.ops:
            ms = [torch.randn(x.shape[0], x.shape[0], device=dev, generator=g) for x in xs]
            ms = [m + m.T for m in ms]
            for i, (d, m, x) in enumerate(zip(cb.gram_backward(ms, xs), ms, xs)):
                checks.append(("gram_backward", i, rel(d, m.double() @ sh(x)), OUT_TOL[dtype]))
        if "cross" in args.ops:
            aa, bb, cc, sx, sy = cb.cross(fx, ys)
            for i, (x, y) in enumerate(zip(fx, ys)):
                X, Y = sh(x), sh(y)
                err = max(rel(aa[i], X.T @ X), rel(bb[i], Y.T @ Y), rel(cc[i], X.T @ Y),
                          rel(sx[i], X.sum(0)), rel(sy[i], Y.sum(0)))
                checks.append(("cross", i, err, PROD_TOL))
        if "cross_backward" in args.ops:
            ms = [torch.randn(x.shape[1], x.shape[1], device=dev, generator=g) for x in fx]
            ns = [torch.randn(y.shape[1], x.shape[1], device=dev, generator=g) for x, y in zip(fx, ys)]
            vs = [torch.randn(x.shape[1], device=dev, generator=g) for x in fx]
            got = cb.cross_backward(fx, ms, ys, ns, vs)
            for i, (d, x, m, y, n, v) in enumerate(zip(got, fx, ms, ys, ns, vs)):
                want = sh(x) @ m.double() + sh(y) @ n.double() + v.double()
                checks.append(("cross_backward", i, rel(d, want), OUT_TOL[dtype]))
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize()
        for op, i, err, tol in checks:
            if not err <= tol:  # NaN fails too
                bad += 1
                shape = tuple((fx if op.startswith("cross") else xs)[i].shape)
                print(f"MISMATCH {dname} {op} layer {i} {shape}: rel err {err:.3g} > {tol:g}")
        worst = {}
        for op, i, err, tol in checks:
            worst[op] = max(worst.get(op, 0.0), err)
        print(f"{dname}: " + ", ".join(f"{op} max rel err {e:.2g}" for op, e in worst.items()), flush=True)
    print("cuda_memcheck_driver: " + ("all results match fp64" if not bad else f"{bad} mismatches"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
