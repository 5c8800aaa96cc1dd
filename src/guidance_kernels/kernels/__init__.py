"""Triton kernels (imported only by :mod:`guidance_kernels.backends.triton`).

* :mod:`.triton_atb`: grouped split-K ``Aᵀ B`` over a host-built work list (forward: every
  layer's Gram ``x xᵀ`` and every pair's ``xᵀx, yᵀy, xᵀy`` + column sums) and its finalize pass.
* :mod:`.triton_aw`: grouped ``A W + A2 W2 + v`` writing activation-sized outputs in the
  activation dtype (backward: ``m x`` and ``x m + y n + v``).
"""
