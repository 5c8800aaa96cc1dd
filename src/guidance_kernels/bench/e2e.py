"""End-to-end row: one guided training step versus the same step without guidance.

Target: a deep fully connected net (``depth`` hidden layers of ``width``, ReLU) on flattened
images; guide: a ResNet-18-shaped conv net (stem, four stages of two basic blocks), frozen, in
eval mode under ``no_grad``. The guide's eight block outputs are mapped to target layers as in
the paper's code, ``round(i (T-1) / (G-1))``. One step = target forward, cross-entropy (+ guide
forward and ``sum (1 - CKA)`` when guided), backward, Adam step. Variants:
``none`` (no guidance), ``gk`` (``guidance_loss``, backend auto) and ``paper`` (the paper
code's formulation). Sizes: batch 256, 224x224 images, widths 64 (guide) / 2048 (target) at
scale 1, multiplied by the bench scale for ``--quick`` (images 32x32 then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from guidance_kernels.truth import loss_and_grad as fp64_loss_and_grad
from guidance_kernels.bench import baselines
from guidance_kernels.bench.timing import measure


@dataclasses.dataclass(frozen=True)
class E2EShape:
    batch: int = 256
    image: int = 224
    guide_width: int = 64
    target_width: int = 2048
    target_depth: int = 16
    classes: int = 100

    def scaled(self, s: float) -> "E2EShape":
        if s == 1.0:
            return self
        return dataclasses.replace(
            self,
            batch=max(16, round(self.batch * s)),
            image=32,
            guide_width=max(4, round(self.guide_width * s)),
            target_width=max(16, round(self.target_width * s)),
        )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


class ResNet18Guide(nn.Module):
    """ResNet-18 layout; ``forward`` returns the eight block outputs."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            blocks += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        acts = []
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
            acts.append(x)
        return acts


class DeepFCN(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, classes: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_in if i == 0 else width, width) for i in range(depth)])
        self.head = nn.Linear(width, classes)
        # He init with zero bias keeps a deep ReLU stack well-conditioned. (PyTorch's default init
        # lets the bias dominate by depth ~8: ||Kc|| / ||K|| ~ 1e-6, a numerics case for the tests,
        # not a timing one.)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        acts = []
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
            acts.append(x)
        return self.head(x), acts


def layer_map(n_guide: int, n_target: int) -> list[int]:
    """Guide layer i -> target layer round(i (T-1) / (G-1)) (the paper's even spread by depth)."""
    return [round(i * (n_target - 1) / max(n_guide - 1, 1)) for i in range(n_guide)]


def run_e2e(device: torch.device, dtype: torch.dtype, cfg, log: Callable = print) -> list[dict]:
    import guidance_kernels as gk

    shape = E2EShape().scaled(cfg.scale)
    torch.manual_seed(cfg.seed)
    guide = ResNet18Guide(shape.guide_width).to(device).eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    target = DeepFCN(3 * shape.image**2, shape.target_width, shape.target_depth, shape.classes).to(device)
    opt = torch.optim.Adam(target.parameters(), lr=1e-4)
    x = torch.randn(shape.batch, 3, shape.image, shape.image, device=device)
    y = torch.randint(0, shape.classes, (shape.batch,), device=device)
    mapping = layer_map(len(guide.blocks), shape.target_depth)
    low = dtype in (torch.bfloat16, torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if low else contextlib.nullcontext()

    losses = {
        "none": None,
        "gk": lambda ts, gs: gk.guidance_loss(ts, gs, metric="cka"),
        "paper": baselines.paper_loss,
    }

    def make_step(guidance):
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits, acts = target(x)
                loss = F.cross_entropy(logits.float(), y)
                if guidance is not None:
                    with torch.no_grad():
                        gacts = guide(x)
                    loss = loss + guidance([acts[m] for m in mapping], gacts)
            loss.backward()
            opt.step()
            return loss

        return step

    # Check both guided losses against fp64 on the same activations before timing.
    with torch.no_grad(), autocast():
        _, acts = target(x)
        gacts = guide(x)
    ts = [acts[m] for m in mapping]
    ref, _ = fp64_loss_and_grad(ts, gacts, "cka")
    tol = 1e-3 * len(ts)
    checks = {}
    for name, fn in losses.items():
        if fn is None:
            continue
        try:
            with torch.no_grad():
                v = float(fn(ts, gacts))
            checks[name] = {"ok": abs(v - ref) <= tol, "loss": v, "ref_loss": ref, "loss_tol": tol}
        except Exception as e:  # noqa: BLE001
            checks[name] = {"ok": False, "why": f"{type(e).__name__}: {e}"[:300]}

    rows = []
    t_none = None
    desc = (
        f"batch {shape.batch}, {shape.image}x{shape.image} images; FCN {shape.target_depth}x{shape.target_width} "
        f"guided by ResNet-18 (width {shape.guide_width}), {len(mapping)} pairs"
    )
    for name, fn in losses.items():
        row = {"variant": name, "shape": desc, "pairs": len(mapping) if fn else 0}
        chk = checks.get(name)
        if chk is not None:
            row["check"] = chk
            if not chk["ok"]:
                row.update(status="wrong", reason=chk.get("why", "guidance loss differs from fp64"))
                rows.append(row)
                continue
        t0 = time.perf_counter()
        try:
            tm = measure(
                make_step(fn),
                [()],
                device,
                warmup=max(1, cfg.warmup),
                min_reps=cfg.min_reps,
                max_reps=cfg.max_reps,
                budget_s=cfg.budget_s * 2,
            )
        except Exception as e:  # noqa: BLE001
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            continue
        row.update(status="ok", median_s=tm.median_s, p20_s=tm.p20_s, p80_s=tm.p80_s, reps=tm.reps)
        if name == "none":
            t_none = tm.median_s
        if t_none:
            row["overhead_pct"] = 100.0 * (tm.median_s / t_none - 1.0)
        log(f"  e2e {name:6s} {tm.median_s * 1e3:9.2f} ms/step ({time.perf_counter() - t0:.1f}s)")
        rows.append(row)
    return rows
