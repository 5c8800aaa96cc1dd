"""The main job's experiments: MNIST-1D and copy-paste (and the old digits study).

``spec`` (what an experiment is), ``verdict`` (the fixed rules), ``mnist1d`` / ``copy_paste`` /
``digits`` (models and sizes per task), ``arms`` (one training run), ``runner`` (seeds x arms in
worker processes), ``report`` (tables, JSON, summary.md), ``plot`` (one figure per experiment).
"""
