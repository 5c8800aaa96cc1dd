"""The canonical bench workloads W1–W5, the only place their sizes live.

A workload is ``n`` samples and a list of layer pairs, each pair a per-sample activation shape for
the target and one for the guide. ``Workload.scaled(s)`` shrinks it for ``--quick``: ``n`` and the
channel dimension of every shape are multiplied by ``s`` (spatial / token dimensions and the
number of pairs are kept), so the structure (how many launches, which form is cheaper) survives.

The cost model (bytes and flops of the floor) is also here, so timing code never computes sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from guidance_kernels.planning import choose_form

Shape = tuple[int, ...]

# Per-sample shapes of the ResNet-18 stage outputs (two blocks per stage) at 224x224 input.
RESNET18_SHAPES: tuple[Shape, ...] = (
    (64, 56, 56), (64, 56, 56),
    (128, 28, 28), (128, 28, 28),
    (256, 14, 14), (256, 14, 14),
    (512, 7, 7), (512, 7, 7),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    n: int
    pairs: tuple[tuple[Shape, Shape], ...]
    # index of the channel dimension in every per-sample shape (scaled by --quick)
    channel_axis: int = 0
    description: str = ""
    scale: float = 1.0

    # ------------------------------------------------------------------ sizes
    def scaled(self, scale: float, min_n: int = 16) -> "Workload":
        if scale == 1.0:
            return self

        def sc(shape: Shape) -> Shape:
            s = list(shape)
            s[self.channel_axis] = max(1, round(s[self.channel_axis] * scale))
            return tuple(s)

        return dataclasses.replace(
            self,
            n=max(min_n, round(self.n * scale)),
            pairs=tuple((sc(a), sc(b)) for a, b in self.pairs),
            scale=self.scale * scale,
        )

    def dims(self) -> list[tuple[int, int, int]]:
        """``(n, p, q)`` of every pair (activations flattened per sample)."""
        return [(self.n, math.prod(a), math.prod(b)) for a, b in self.pairs]

    def forms(self) -> list[str]:
        return [choose_form(*d) for d in self.dims()]

    def cost(self, dtype: torch.dtype, backward: bool) -> dict:
        """Bytes and flops of the floor (README "How the floor is computed").

        Forward: one read of every activation (target and guide); flops of the cheaper form per
        pair, ``2 n² (p + q)`` (sample) or ``2 n (pq + p² + q²)`` (feature).
        Backward adds one more read of the target activation and one write of its gradient, and
        ``2 n² p`` (sample) or ``2 n (pq + p²)`` (feature) flops per pair.
        """
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = flops = 0
        for (n, p, q), form in zip(self.dims(), self.forms()):
            nbytes += n * (p + q) * esize
            if form == "sample":
                flops += 2 * n * n * (p + q)
            else:
                flops += 2 * n * (p * q + p * p + q * q)
            if backward:
                nbytes += 2 * n * p * esize
                flops += 2 * n * n * p if form == "sample" else 2 * n * (p * q + p * p)
        return {"bytes": nbytes, "flops": flops}

    def input_bytes(self, dtype: torch.dtype) -> int:
        esize = torch.empty((), dtype=dtype).element_size()
        return sum(n * (p + q) * esize for n, p, q in self.dims())

    def summary(self) -> str:
        dims = self.dims()
        ps = sorted({p for _, p, _ in dims})
        qs = sorted({q for _, _, q in dims})

        def rng(v):
            return str(v[0]) if len(v) == 1 else f"{v[0]}..{v[-1]}"

        return f"n={self.n}, {len(dims)} pairs, p={rng(ps)}, q={rng(qs)}"

    # ------------------------------------------------------------------ inputs
    def make_inputs(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        seed: int = 0,
        requires_grad: bool = True,
        rank: int = 8,
        noise: float = 1.0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Correlated activations ``(n, *shape)``: every layer is ``Z A_l + noise`` for one shared
        low-rank latent ``Z`` (n x rank), so CKA is well inside (0, 1) rather than ~0, and a wrong
        implementation cannot hide behind tiny values. Targets require grad (training setting)."""
        device = torch.device(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(self.n, rank, generator=g).to(device)

        def act(shape: Shape, scale: float) -> torch.Tensor:
            p = math.prod(shape)
            a = torch.randn(rank, p, generator=g).to(device) * scale
            e = torch.randn(self.n, p, generator=g).to(device) * noise
            return (z @ a + e).to(dtype).reshape(self.n, *shape)

        xs, ys = [], []
        for i, (ts, gs) in enumerate(self.pairs):
            x = act(ts, 1.0 + 0.1 * (i % 3))
            xs.append(x.requires_grad_(requires_grad))
            ys.append(act(gs, 0.7 + 0.1 * (i % 4)))
        return xs, ys


def _workloads() -> dict[str, Workload]:
    w1 = Workload(
        "resnet18_b256",
        n=256,
        pairs=tuple((s, s) for s in RESNET18_SHAPES),
        description="W1: ResNet-18 stage outputs, target and guide the same shapes",
    )
    w2 = Workload(
        "fcn_guided_b256",
        n=256,
        pairs=tuple(((2048,), RESNET18_SHAPES[i % len(RESNET18_SHAPES)]) for i in range(32)),
        description="W2: 32 FCN layers of width 2048 guided by layers cycling the W1 shapes",
    )
    w3 = Workload(
        "gpt_tokens",
        n=16384,
        pairs=tuple(((1024,), (768,)) for _ in range(24)),
        description="W3: 24 token-level pairs, p=1024 vs q=768 (feature space)",
    )
    w4 = Workload(
        "vit_b128",
        n=128,
        pairs=tuple(((197, 768), (197, 768)) for _ in range(12)),
        channel_axis=-1,
        description="W4: ViT-B blocks, (197, 768) tokens flattened per sample",
    )
    w5 = Workload(
        "many_small",
        n=64,
        pairs=tuple(((512,), (512,)) for _ in range(128)),
        description="W5: 128 small pairs, p=q=512 (launch overhead)",
    )
    return {w.name: w for w in (w1, w2, w3, w4, w5)}


WORKLOADS: dict[str, Workload] = _workloads()
# Short aliases accepted by the CLI: W1..W5.
ALIASES = {f"W{i + 1}": name for i, name in enumerate(WORKLOADS)}

QUICK_SCALE = 0.125  # --quick: n and channels / 8 (about a minute for the whole suite on 2 cores)


def get_workloads(names: Optional[list[str]] = None, scale: float = 1.0) -> list[Workload]:
    if not names:
        names = list(WORKLOADS)
    out = []
    for name in names:
        key = ALIASES.get(name.upper(), name) if name.upper() in ALIASES else name
        if key not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS)} or W1..W5")
        out.append(WORKLOADS[key].scaled(scale))
    return out
