"""Device ceilings measured in the same run: copy bandwidth and matmul rate.

* Copy: ``dst.copy_(src)`` of a large buffer on the device; bytes moved = 2 x size (one read,
  one write). GB/s = bytes / median time.
* Matmul: a square ``m x m x m`` product, ``2 m³`` flops, in the workload dtype and in fp32;
  the ceiling is the faster of the two (the products accumulate in fp32, and a floor must be a
  lower bound on time whichever path an implementation takes). An fp64 rate is measured too,
  only to estimate the run time of fp64 peers.
"""

from __future__ import annotations

import dataclasses

import torch

from guidance_kernels.bench.timing import measure


@dataclasses.dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_rates: dict  # dtype name -> flop/s
    copy_size_bytes: int
    matmul_size: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_sizes(device: torch.device, quick: bool) -> tuple[int, int]:
    """(copy buffer bytes, matmul m): large enough to leave every cache, small enough to be quick."""
    if device.type == "cuda":
        return (1 << 30, 8192) if not quick else (256 << 20, 4096)
    return (256 << 20, 2048) if not quick else (128 << 20, 1024)


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Ceilings:
    copy_bytes, m = default_sizes(device, quick)
    budget = 0.3 if quick else 1.0
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    t = measure(lambda: dst.copy_(src), [()], device, warmup=2, min_reps=5, budget_s=budget)
    bw = 2 * src.numel() * 4 / t.median_s
    del src, dst

    rates = {}
    for dt in dict.fromkeys([dtype, torch.float32, torch.float64]):
        mm = m if dt != torch.float64 else m // 2
        a = torch.randn(mm, mm, device=device).to(dt)
        b = torch.randn(mm, mm, device=device).to(dt)
        tm = measure(lambda: a @ b, [()], device, warmup=2, min_reps=5, budget_s=budget)
        rates[str(dt).replace("torch.", "")] = 2 * mm**3 / tm.median_s
    # fp64 is measured only for run-time estimates (fp64 peers); it never sets the floor.
    best = max((k for k in rates if k != "float64" or dtype == torch.float64), key=rates.get)
    return Ceilings(bw, rates[best], best, rates, copy_bytes, m)


def floor_seconds(cost: dict, ceilings: Ceilings) -> tuple[float, str]:
    """Floor time of a call from its cost (bytes, flops) and the ceilings, and what bounds it."""
    t_mem = cost["bytes"] / ceilings.copy_bytes_per_s
    t_math = cost["flops"] / ceilings.matmul_flops_per_s
    return (t_mem, "memory") if t_mem >= t_math else (t_math, "math")
