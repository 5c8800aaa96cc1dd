"""Test-wide set-up.

* Without a GPU, Triton kernels run under the interpreter on CPU tensors; the variable must be
  set before any ``@triton.jit`` function is created, so it is set here, first.
* ``torch.empty`` and friends are poisoned with NaN so that any element a kernel forgets to
  write fails the comparison against the reference.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t):
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    return t


def _empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _empty)
    monkeypatch.setattr(torch, "empty_like", _empty_like)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
