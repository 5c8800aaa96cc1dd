"""Debiased linear CKA in feature space: no ``n x n`` Gram, ``O(n (p² + pq + q²))`` work and
``O(p² + pq + q² + n)`` memory besides one row block of each input.

With ``z_i``, ``w_i`` the rows of ``x``, ``y`` shifted by their column means (any shift gives the
same estimator: U-centering removes it; the mean keeps the sums below well-conditioned),
``K~ = Z Zᵀ`` and ``L~ = W Wᵀ`` with zeroed diagonals, ``d_i = ||z_i||²``, ``e_i = ||w_i||²``,
``s_z = Σ z_i``, ``a = Z s_z - d``, ``b = W s_w - e``::

    tr(K~ L~)  = ||Zᵀ W||² - Σ d e
    1ᵀ K~ 1    = ||s_z||² - Σ d                     (S_K)
    1ᵀ K~ L~ 1 = Σ a b = s_zᵀ C s_w - s_z·Zᵀe - s_w·Wᵀd + Σ d e
    N(K, L)    = tr(K~ L~) + S_K S_L / ((n-1)(n-2)) - 2/(n-2) 1ᵀ K~ L~ 1

``N`` is ``n (n-3)`` times the unbiased HSIC of Song et al. (2012); debiased CKA is
``N(K, L) / sqrt(N(K, K) N(L, L))``, equal to the sample-space estimator
(:func:`guidance_kernels.metrics.cka_from_grams` with ``debiased=True``) to rounding.

Products accumulate in fp32 (fp64 for fp64 input) one row block at a time; the scalar terms are
summed in fp64 after dividing by the traces ``Σ d``, ``Σ e`` (the score is scale invariant).
Degenerate rule (as the sample form, at this form's rounding level): a trace at or below
``tiny / eps`` of the accumulation dtype, or ``N(K, K) <= 64 eps ||K~||²`` (``N(K,K)`` is then a
difference of rounded terms), gives 0 and a zero gradient. The backward is hand-written (one more
pass over the rows: ``dZ = Z M + W Nm + r∘Z + u s_zᵀ + 1 vᵀ``); a second derivative
(``create_graph=True``) recomputes the score in plain differentiable PyTorch (memory
``O(n (p + q))``). No host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_kernels.backends import cpu_syrk
from guidance_kernels.backends.reference import add_zz_, pair_buffer, shifted_pair, symmetric_cpu
from guidance_kernels.metrics import tolerance

__all__ = ["debiased_cka_features", "debiased_cka_features_plain"]

_BLOCK_ELEMS = 1 << 20  # elements of the row blocks of x and y together (4 MiB of fp32; 8 MiB
# blocks ran no faster and left 83 vs 58 MiB of peak RSS at n = 16384, p = q = 256)


def _rows(n: int, width: int):
    step = max(1, _BLOCK_ELEMS // max(width, 1))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _mean(x: Tensor, acc: torch.dtype, blocks) -> Tensor:
    """Approximate column means (p,) in ``acc``: ``x0 + Σ(x - x0)/n`` (exactly ``x0`` for a
    constant column, so a constant input shifts to exactly 0). Any shift is exact for the
    formulas (they carry ``s_z``); the mean only keeps their terms from cancelling."""
    x = x.detach()
    x0 = x[0].to(acc)
    s = x0.new_zeros(x.shape[1])
    for a, b in blocks:
        s = s + (x[a:b].to(acc) - x0).sum(0)
    return x0 + s / x.shape[0]


def _forward_sums(x: Tensor, y: Tensor, acc: torch.dtype):
    """Raw sums (in ``acc``) of the mean-shifted rows ``z``, ``w``: A = ZᵀZ, B = WᵀW, C = ZᵀW,
    s_z, s_w, d, e, Zᵀd, Zᵀe, Wᵀd, Wᵀe; plus the means."""
    n = x.shape[0]
    blocks = _rows(n, x.shape[1] + y.shape[1])
    mx, my = _mean(x, acc, blocks), _mean(y, acc, blocks)
    ds, es = [], []
    out = None
    for s, t in blocks:
        zb, wb = x[s:t].to(acc) - mx, y[s:t].to(acc) - my
        db, eb = (zb * zb).sum(1), (wb * wb).sum(1)
        ds.append(db)
        es.append(eb)
        part = [zb.T @ zb, wb.T @ wb, zb.T @ wb, zb.sum(0), wb.sum(0),
                zb.T @ db, zb.T @ eb, wb.T @ db, wb.T @ eb]
        out = part if out is None else [o + pt for o, pt in zip(out, part)]
    return out, torch.cat(ds), torch.cat(es), mx, my


def _forward_sums_fast(x: Tensor, y: Tensor, acc: torch.dtype):
    """:func:`_forward_sums` without autograd (the forward of :class:`_FeatureDebiased`): each row
    block of ``[z w]`` is written into one reused buffer, ``[z w]ᵀ[z w]`` (holding A, B, C) is one
    symmetric product (``?syrk`` on CPU: half the multiply-adds), ``[z w]ᵀ [d e]`` one GEMM, all
    accumulated in place."""
    n, p = x.shape
    w = p + y.shape[1]
    blocks = _rows(n, w)
    mx, my = _mean(x, acc, blocks), _mean(y, acc, blocks)
    sym = symmetric_cpu(x, acc)
    buf = pair_buffer(x, y, acc, blocks)
    full = x.new_zeros((w, w), dtype=acc)
    sums = x.new_zeros((w,), dtype=acc)
    mom = x.new_zeros((w, 2), dtype=acc)  # [z w]ᵀ [d e]
    de = x.new_empty((n, 2), dtype=acc)
    for i, (s, t) in enumerate(blocks):
        zw = shifted_pair(buf, x, y, s, t, (mx[None], my[None]))
        torch.linalg.vecdot(zw[:, :p], zw[:, :p], out=de[s:t, 0])
        torch.linalg.vecdot(zw[:, p:], zw[:, p:], out=de[s:t, 1])
        add_zz_(full, zw, i == 0, sym)
        sums += zw.sum(0)
        mom.addmm_(zw.T, de[s:t])
    if sym:
        full = cpu_syrk.mirror_lower(full)
    sums_out = [full[:p, :p], full[p:, p:], full[:p, p:], sums[:p], sums[p:],
                mom[:p, 0], mom[:p, 1], mom[p:, 0], mom[p:, 1]]
    return sums_out, de[:, 0], de[:, 1], mx, my


def _inv(tr: Tensor, acc: torch.dtype) -> Tensor:
    """``1 / tr`` held constant (the score is scale invariant), 0 at or below the floor."""
    tr = tr.detach()
    fi = torch.finfo(acc)
    ok = tr > fi.tiny / fi.eps
    return torch.where(ok, 1 / torch.where(ok, tr, torch.ones_like(tr)), torch.zeros_like(tr))


def _terms(sums, d, e, acc):
    """Trace-normalized fp64 statistics and the three ``N`` values (see module doc)."""
    A, B, C, sz, sw, zd, ze, wd, we = (t.double() for t in sums)
    d, e = d.double(), e.double()
    n = d.shape[0]
    kx, ky = _inv(d.sum(), acc), _inv(e.sum(), acc)
    rx, ry = kx.sqrt(), ky.sqrt()
    A, B, C = A * kx, B * ky, C * (rx * ry)
    sz, sw, d, e = sz * rx, sw * ry, d * kx, e * ky
    zd, ze, wd, we = zd * (rx * kx), ze * (rx * ky), wd * (ry * kx), we * (ry * ky)
    c2, c3 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
    SK, SL = sz @ sz - d.sum(), sw @ sw - e.sum()
    de, dd, ee = d @ e, d @ d, e @ e
    refk, refl = (A * A).sum() - dd, (B * B).sum() - ee
    N = (C * C).sum() - de + c2 * SK * SL - c3 * (sz @ C @ sw - sz @ ze - sw @ wd + de)
    P = refk + c2 * SK * SK - c3 * (sz @ A @ sz - 2 * (sz @ zd) + dd)
    Q = refl + c2 * SL * SL - c3 * (sw @ B @ sw - 2 * (sw @ we) + ee)
    tol = tolerance(acc)
    deg = (kx == 0) | (ky == 0) | (P <= tol * refk) | (Q <= tol * refl)
    st = dict(A=A, B=B, C=C, sz=sz, sw=sw, zd=zd, ze=ze, wd=wd, we=we, SK=SK, SL=SL, N=N, P=P, Q=Q,
              rx=rx, ry=ry, kx=kx, ky=ky, c2=c2, c3=c3, deg=deg)
    return st


def _score(st) -> Tensor:
    den = torch.sqrt(torch.where(st["deg"], torch.ones_like(st["P"]), st["P"] * st["Q"]))
    return torch.where(st["deg"], torch.zeros_like(den), st["N"] / den)


def _side_coefs(st, side: str, al: Tensor, be: Tensor):
    """fp64 coefficients of one side's gradient in the normalized variables (``side`` "x": own
    width p, other q): ``M`` (p, p), ``Nm`` (q, p), ``v`` (p,), and the scalars ``S`` of its own
    and the other side (the per-row ``r``, ``u`` are formed block by block in the backward).
    ``al = g / sqrt(PQ)``, ``be = -g N / (2 P_own sqrt(PQ))``."""
    if side == "x":
        A, C, s_self, s_oth, z_oth, z_self, S_self, S_oth = (st[k] for k in ("A", "C", "sz", "sw", "ze", "zd", "SK", "SL"))
    else:
        A, C, s_self, s_oth, z_oth, z_self, S_self, S_oth = (st[k] for k in ("B", "C", "sw", "sz", "wd", "we", "SL", "SK"))
        C = C.T
    c2, c3 = st["c2"], st["c3"]
    M = 4 * be * A
    Nm = 2 * al * C.T
    v = -al * c3 * (C @ s_oth - z_oth) - 2 * be * c3 * (A @ s_self - z_self)
    return M, Nm, v, S_self, S_oth


class _FeatureDebiased(torch.autograd.Function):
    """One pair ``x`` (n, p), ``y`` (n, q) -> 0-dim debiased CKA (fp64); see module doc."""

    @staticmethod
    def forward(ctx, x, y):
        acc = _acc(x, y)
        fast = not torch.compiler.is_compiling()  # traced: the plain form (no out=, no BLAS calls)
        sums, d, e, mx, my = (_forward_sums_fast if fast else _forward_sums)(x, y, acc)
        st = _terms(sums, d, e, acc)
        ctx.acc = acc
        ctx.st = {k: v for k, v in st.items() if k not in ("c2", "c3")}
        ctx.consts = (st["c2"], st["c3"])
        ctx.save_for_backward(x, y, d, e, mx, my)
        return _score(st)

    @staticmethod
    def backward(ctx, g):
        x, y, d, e, mx, my = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain form
            ins = [t for t, f in ((x, need_x), (y, need_y)) if f]
            got = iter(torch.autograd.grad(debiased_cka_features_plain(x, y), ins, g, create_graph=True))
            return (next(got) if need_x else None), (next(got) if need_y else None)
        st = dict(ctx.st)
        st["c2"], st["c3"] = ctx.consts
        acc, c2, c3 = ctx.acc, st["c2"], st["c3"]
        N, P, Q, deg = st["N"], st["P"], st["Q"], st["deg"]
        gd = torch.where(deg, torch.zeros_like(N), g.double())
        P1, Q1 = torch.where(deg, 1.0, P), torch.where(deg, 1.0, Q)
        root = torch.sqrt(P1 * Q1)
        al = gd / root
        bx, by = -gd * N / (2 * P1 * root), -gd * N / (2 * Q1 * root)
        # eager: rows written in place; traced (torch.compile): blocks concatenated (no mutation)
        inplace = not torch.compiler.is_compiling()
        dx = (torch.empty_like(x, memory_format=torch.contiguous_format) if inplace else []) if need_x else None
        dy = (torch.empty_like(y, memory_format=torch.contiguous_format) if inplace else []) if need_y else None
        sides = []
        if need_x:
            sides.append((dx, _side_coefs(st, "x", al, bx), bx, st["rx"], st["ry"], st["kx"], st["ky"], st["sz"], st["sw"], True))
        if need_y:
            sides.append((dy, _side_coefs(st, "y", al, by), by, st["ry"], st["rx"], st["ky"], st["kx"], st["sw"], st["sz"], False))
        folded = []
        for out, (M, Nm, v, S_self, S_oth), be, r_s, r_o, k_s, k_o, s_s, s_o, is_x in sides:
            M, Nm = (k_s * M).to(acc), (r_s * r_o * Nm).to(acc)
            W = torch.cat([M, Nm] if is_x else [Nm, M])  # [z w] W = own M + other Nm: one GEMM
            folded.append((out, W, (r_s * v).to(acc), s_s.to(acc), s_o.to(acc), S_self, S_oth, be, r_s, r_o,
                           k_s, k_o, is_x))
        p = x.shape[1]
        blocks = _rows(x.shape[0], p + y.shape[1])
        buf = pair_buffer(x, y, acc, blocks) if inplace else None
        for s, t in blocks:
            if inplace:  # the shifted rows in one reused buffer
                zw = shifted_pair(buf, x, y, s, t, (mx[None], my[None]))
            else:
                zw = torch.cat([x[s:t].to(acc) - mx, y[s:t].to(acc) - my], 1)
            zb, wb = zw[:, :p], zw[:, p:]
            for out, W, v, s_s, s_o, S_self, S_oth, be, r_s, r_o, k_s, k_o, is_x in folded:
                own, oth = (zb, wb) if is_x else (wb, zb)
                d_own, d_oth = (d, e) if is_x else (e, d)
                dn_s, dn_o = d_own[s:t].double() * k_s, d_oth[s:t].double() * k_o
                a = r_s * (own @ s_s).double() - dn_s  # normalized rows of a (own) and b (other)
                b = r_o * (oth @ s_o).double() - dn_o
                r = al * (-2 * dn_o - 2 * c2 * S_oth + 2 * c3 * b) + be * (-4 * dn_s - 4 * c2 * S_self + 4 * c3 * a)
                u = -al * c3 * b - 2 * be * c3 * a + 2 * al * c2 * S_oth + 4 * be * c2 * S_self
                direct = inplace and out.dtype == acc
                blk = torch.addmm(v, zw, W, out=out[s:t]) if direct else torch.addmm(v, zw, W)
                blk.addcmul_((k_s * r).to(acc)[:, None], own).addr_((r_s * u).to(acc), s_s)
                if not inplace:
                    out.append(blk)
                elif not direct:
                    out[s:t] = blk
        if not inplace:
            dx = torch.cat(dx).to(x.dtype) if need_x else None
            dy = torch.cat(dy).to(y.dtype) if need_y else None
        return dx, dy


def _acc(x: Tensor, y: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def debiased_cka_features(x: Tensor, y: Tensor) -> Tensor:
    """Debiased linear CKA of ``x`` (n, p) and ``y`` (n, q), n >= 4, in feature space -> 0-dim
    tensor in fp32 (fp64 if either input is fp64); differentiable (hand-written backward)."""
    out = _FeatureDebiased.apply(x, y)
    return out.to(_acc(x, y))


def debiased_cka_features_plain(x: Tensor, y: Tensor) -> Tensor:
    """The same value in plain differentiable PyTorch (any order of derivative; autograd keeps
    row-block temporaries, ``O(n (p + q))`` memory): the double-backward path, and a check."""
    acc = _acc(x, y)
    sums, d, e, _, _ = _forward_sums(x, y, acc)
    return _score(_terms(sums, d, e, acc))
