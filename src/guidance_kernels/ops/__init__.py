"""``torch.library`` ops (namespace ``guidance_kernels``) for the activation-sized products,
one call per group of layers, results stacked (see :mod:`guidance_kernels.ops.products`)."""

from guidance_kernels.ops.products import cross, cross_backward, gram, gram_backward, group_by

__all__ = ["gram", "gram_backward", "cross", "cross_backward", "group_by"]
