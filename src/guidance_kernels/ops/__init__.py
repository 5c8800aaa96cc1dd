"""``torch.library`` ops (namespace ``guidance_kernels``) for the activation-sized products,
one call per group of layers, results stacked (see :mod:`guidance_kernels.ops.products`), and
the CKA statistics of stacked Grams (:mod:`guidance_kernels.ops.stats`)."""

from guidance_kernels.ops.products import cross, cross_backward, gram, gram_backward
from guidance_kernels.ops.stats import gram_stats

__all__ = ["gram", "gram_backward", "cross", "cross_backward", "gram_stats"]
