"""Every implementation the bench times, in ONE place (the fp64 truth they are checked against is
``guidance_kernels.truth.loss_and_grad``; the peers' adapters are in ``peer_adapters.py``).

An implementation computes the guidance loss ``sum_l (1 - CKA(X_l, Y_l))`` of a workload's pairs
(activations ``(n, *shape)``, flattened per sample) and returns a 0-dim tensor:

* ``gk:<backend>``: this package, ``guidance_kernels.guidance_loss(..., backend=<backend>)``,
  one row per backend available on the device.
* ``eager``: a per-layer PyTorch loop of the same math: cast to fp32, centre the columns (a
  centred copy per layer), the cheaper of the sample / feature forms per pair (``docs/design.md``, cost model).
* ``torch.compile``: the same functions through ``torch.compile`` (scope ``pair``: each per-pair
  function compiled once with dynamic shapes; scope ``loss``: the whole loop, per workload).
* ``paper``: the paper code's formulation: fp32, six Gram matrices per pair and an explicit
  ``H K H`` with a materialised ``n x n`` centring matrix.
* peers from PyPI, forward only: ``ckatorch`` (``cka_base``, fp64 internally, biased CKA),
  ``pytorch-cka`` (``cka.cka_from_features``, debiased CKA, clamped to [0, 1]) and ``torch-cka``
  (``torch_cka.CKA(...).compare``, debiased CKA, model + data-loader API). Peers are given fp32
  copies where they cannot take bf16 (the cast is inside the timed call).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from guidance_kernels.bench.workloads import Workload, choose_form
from guidance_kernels.peer_adapters import PEERS, Peer

LossFn = Callable[[list[Tensor], list[Tensor]], Tensor]


# =========================================================================== eager / compile
def _flat32(t: Tensor) -> Tensor:
    return t.flatten(1).float()


def cka_sample(x: Tensor, y: Tensor) -> Tensor:
    """Eager sample-space CKA: fp32 copies, centred copies, two Grams."""
    x, y = _flat32(x), _flat32(y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    k = x @ x.T
    l_ = y @ y.T
    return (k * l_).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_))


def cka_feature(x: Tensor, y: Tensor) -> Tensor:
    """Eager feature-space CKA: fp32 copies, centred copies, three cross-covariances."""
    x, y = _flat32(x), _flat32(y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    s = (x.T @ y).square().sum()
    return s / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))


def _pair_form(x: Tensor, y: Tensor) -> str:
    return choose_form(x.shape[0], x[0].numel(), y[0].numel())


def eager_loss(xs: list[Tensor], ys: list[Tensor], sample=cka_sample, feature=cka_feature) -> Tensor:
    total = xs[0].new_zeros((), dtype=torch.float32)
    for x, y in zip(xs, ys):
        f = feature if _pair_form(x, y) == "feature" else sample
        total = total + (1.0 - f(x, y))
    return total


class _CompiledPair:
    """Per-pair functions compiled once each, with dynamic shapes (shared by all workloads)."""

    sample = None
    feature = None

    @classmethod
    def get(cls):
        if cls.sample is None:
            cls.sample = torch.compile(cka_sample, dynamic=True)
            cls.feature = torch.compile(cka_feature, dynamic=True)
        return cls.sample, cls.feature


def compiled_loss(scope: str) -> LossFn:
    if scope == "pair":
        s, f = _CompiledPair.get()
        return lambda xs, ys: eager_loss(xs, ys, sample=s, feature=f)
    # scope == "loss": the whole loop traced, a fresh compiled function per workload
    return torch.compile(eager_loss, dynamic=False)


# =========================================================================== paper formulation
def _paper_centering(k: Tensor) -> Tensor:
    n = k.shape[0]
    unit = torch.ones(n, n, device=k.device, dtype=k.dtype)
    eye = torch.eye(n, device=k.device, dtype=k.dtype)
    h = eye - unit / n
    return torch.matmul(torch.matmul(h, k), h)


def _paper_linear_hsic(x: Tensor, y: Tensor) -> Tensor:
    l_x = torch.matmul(x, x.T)
    l_y = torch.matmul(y, y.T)
    return torch.sum(_paper_centering(l_x) * _paper_centering(l_y))


def paper_cka(x: Tensor, y: Tensor) -> Tensor:
    """The paper code's linear CKA: three HSICs -> six Grams and six ``H K H`` products, fp32."""
    x, y = _flat32(x), _flat32(y)
    hsic = _paper_linear_hsic(x, y)
    var1 = torch.sqrt(_paper_linear_hsic(x, x))
    var2 = torch.sqrt(_paper_linear_hsic(y, y))
    return hsic / (var1 * var2)


def paper_loss(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    total = xs[0].new_zeros((), dtype=torch.float32)
    for x, y in zip(xs, ys):
        total = total + (1.0 - paper_cka(x, y))
    return total


# =========================================================================== registry
@dataclasses.dataclass
class Impl:
    name: str
    kind: str  # "ours" | "baseline" | "peer"
    metric: str  # "cka" | "debiased_cka": which fp64 truth it is checked against
    differentiable: bool
    make: Callable[[Workload, dict], LossFn]  # (workload, options) -> loss function
    why_unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    # estimated flops of one forward call, to skip calls that would take far too long
    est_flops: Optional[Callable[[Workload], float]] = None
    package: Optional[str] = None  # PyPI name for peers
    note: str = ""
    est_dtype: str = "best"  # matmul rate used for the estimate: "best" or a dtype name ("float64")


def _gk_impl(backend: str) -> Impl:
    def why(device: torch.device) -> Optional[str]:
        try:
            import guidance_kernels as gk  # noqa: F401
            from guidance_kernels.backends import get_backend

            if not hasattr(gk, "guidance_loss"):
                return "guidance_kernels.guidance_loss is not there yet"
            reason = get_backend(backend).available(device)
        except Exception as e:  # noqa: BLE001 - a missing toolchain is a reason, not a crash
            return f"{type(e).__name__}: {e}"
        if reason is None and backend == "triton" and device.type == "cpu":
            return "Triton on CPU runs only in the interpreter: not a performance path"
        return reason

    def make(w: Workload, opts: dict) -> LossFn:
        import guidance_kernels as gk

        return lambda xs, ys: gk.guidance_loss(xs, ys, metric="cka", backend=backend)

    return Impl(f"gk:{backend}", "ours", "cka", True, make, why, note=f"guidance_loss(backend={backend!r})")


def _n3_flops(w: Workload, grams: int, n3: int) -> float:
    return sum(2.0 * n * n * (p + q) * grams / 2 + 2.0 * n**3 * n3 for n, p, q in w.dims())


def _peer(peer: Peer, est) -> Impl:
    return Impl(peer.dist, "peer", peer.metric, False, lambda w, o: peer.pair_loss,
                lambda device: peer.why_unavailable(), est, package=peer.dist, note=peer.note,
                est_dtype="float64" if peer.dist == "ckatorch" else "best")


def implementations(backends: Optional[list[str]] = None) -> list[Impl]:
    """All implementations, in report order. ``backends``: this package's backends to include."""
    if backends is None:
        try:
            from guidance_kernels.backends import list_backends

            backends = list_backends()
        except Exception:  # noqa: BLE001
            backends = ["reference"]
    impls = [_gk_impl(b) for b in backends]
    impls += [
        Impl("eager", "baseline", "cka", True, lambda w, o: eager_loss, note="per-layer PyTorch loop, fp32"),
        Impl(
            "torch.compile",
            "baseline",
            "cka",
            True,
            lambda w, o: compiled_loss(o.get("compile_scope", "pair")),
            note="torch.compile of the eager math",
        ),
        Impl(
            "paper",
            "baseline",
            "cka",
            True,
            lambda w, o: paper_loss,
            est_flops=lambda w: _n3_flops(w, grams=6, n3=12),
            note="six Grams + explicit H K H per pair, fp32",
        ),
        _peer(PEERS["ckatorch"], lambda w: _n3_flops(w, 2, 0)),
        _peer(PEERS["pytorch-cka"], lambda w: _n3_flops(w, 2, 0)),
        _peer(PEERS["torch-cka"], lambda w: _n3_flops(w, 3, 3)),
    ]  # fmt: skip
    return impls


def est_seconds(impl: Impl, w: Workload, matmul_flops_per_s: float, rates: Optional[dict] = None) -> float:
    """Rough time of one forward call from its flop count and the measured matmul rate (the
    rate of ``impl.est_dtype`` when ``rates`` has it, e.g. fp64 for ckatorch)."""
    if impl.est_flops is None:
        return 0.0
    rate = (rates or {}).get(impl.est_dtype, matmul_flops_per_s)
    return impl.est_flops(w) / max(rate, 1.0)


__all__ = [
    "Impl",
    "implementations",
    "eager_loss",
    "compiled_loss",
    "paper_loss",
    "paper_cka",
    "cka_sample",
    "cka_feature",
    "est_seconds",
]
