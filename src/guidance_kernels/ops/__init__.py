"""``torch.library`` ops (namespace ``guidance_kernels``) for the activation-sized products."""

from guidance_kernels.ops.products import cross, cross_backward, gram, gram_backward

__all__ = ["gram", "gram_backward", "cross", "cross_backward"]
