"""Guidance inside the trainers people already use.

* :mod:`guidance_kernels.integrations.lightning` — :class:`GuidanceMixin` for a Lightning
  ``LightningModule`` (extra ``lightning``);
* :mod:`guidance_kernels.integrations.huggingface` — :class:`GuidedTrainer`, a Hugging Face
  ``transformers.Trainer`` (extra ``hf``).

Both wrap :class:`guidance_kernels.train.Guidance`; the submodules import their framework only
where they need it, so this package imports without either installed.
"""
