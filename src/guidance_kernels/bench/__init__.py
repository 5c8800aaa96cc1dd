"""Bench suite: the canonical workloads W1–W5 (``workloads.py``) against eager, torch.compile, the paper's
formulation and PyPI peers, as a percent of the device floor. See ``bench/README.md``.

>>> from guidance_kernels.bench import BenchConfig, run_bench  # doctest: +SKIP
>>> result = run_bench(BenchConfig(quick=True, device="cpu"))  # doctest: +SKIP
"""

from guidance_kernels.bench.runner import BenchConfig, run_bench
from guidance_kernels.bench.workloads import QUICK_SCALE, WORKLOADS, Workload, get_workloads

__all__ = ["BenchConfig", "run_bench", "WORKLOADS", "Workload", "get_workloads", "QUICK_SCALE"]
