"""Triton kernels (imported only by :mod:`guidance_kernels.backends.triton`), one file per op
they serve, each beside its reference in :mod:`guidance_kernels.backends.reference` /
:mod:`guidance_kernels.metrics` (contract and math: ``docs/design.md``):

* :mod:`.triton_forward`: forward of ``gram`` and ``cross``, grouped split-K ``A'ᵀ B'`` over a
  host-built work list (every layer's Gram ``x' x'ᵀ`` and every pair's ``x'ᵀx', y'ᵀy', x'ᵀy'``
  + column sums) and its finalize pass.
* :mod:`.triton_backward`: ``gram_backward`` / ``cross_backward``, grouped
  ``A' W + A2' W2 + v`` writing activation-sized outputs in the activation dtype.
* :mod:`.triton_stats`: ``gram_stats``, the CKA statistics of stacked Grams.
* :mod:`.tables`: the layout of the descriptor tables, shared by the kernels and the host
  planner (:mod:`guidance_kernels.backends.triton_plan`).
"""
