"""Representational similarity analysis: layer-by-layer CKA maps of two models over a dataset
(minibatch unbiased CKA), heatmaps, and the guidability report. See docs/similarity.md."""

from guidance_kernels.similarity.minibatch import MIN_BATCH, MinibatchCKA, minibatch_cka

__all__ = ["MIN_BATCH", "MinibatchCKA", "minibatch_cka"]
