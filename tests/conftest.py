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


def _squeeze_scalars_in_old_triton_interpreter():
    """triton < 3.7's interpreter turns a scalar into a Python int with ``int(data)`` of a
    1-element array, which numpy >= 2.5 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"): ``for k in range(k0, k1, BK)`` over loaded bounds then fails under
    TRITON_INTERPRET=1 with triton 3.6 + numpy 2.5 (seen with torch 2.11). triton 3.8 squeezes
    first; this applies the same squeeze to the old interpreter (interpreter only: compiled
    kernels never go through it)."""
    try:
        import inspect

        from triton.runtime import interpreter as ti

        orig = ti._patch_lang_tensor
        if "int(self.handle.data))" not in inspect.getsource(orig):
            return
    except Exception:  # noqa: BLE001 - no triton, or an interpreter without this function
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    ti._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _squeeze_scalars_in_old_triton_interpreter()

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
