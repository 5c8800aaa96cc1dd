"""Forward hooks that record layer outputs during an ordinary forward pass.

:class:`ActivationRecorder` registers one forward hook per selected module at construction and
records only while :meth:`ActivationRecorder.recording` is active, so evaluation forwards cost
nothing and keep nothing. A module that returns a tuple (RNNs, ``nn.MultiheadAttention``,
Hugging Face blocks) contributes its first tensor element; one that returns a mapping (a Hugging
Face ``ModelOutput``) its ``last_hidden_state`` if present, else its first tensor value. Anything
else is a TypeError that names the layer. A module that runs twice inside one recording (weight sharing)
is an error: which call to align would be ambiguous. :meth:`close` removes every hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Sequence

import torch
from torch import nn

from guidance_kernels.train.mapping import unwrap


def first_tensor(out, name: str = "?") -> torch.Tensor:
    """The hidden states in a module's output (see the module docstring); ``name`` is the layer,
    for the error."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # ModelOutput is an OrderedDict (None fields are left out)
        hidden = out.get("last_hidden_state")
        if isinstance(hidden, torch.Tensor):
            return hidden
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(
        f"layer {name!r} returned a {type(out).__name__} with no tensor to record; select a "
        "sub-module that returns the hidden states (a tensor, or a tuple / ModelOutput holding them)"
    )


class ActivationRecorder:
    """Record the outputs of ``names`` (modules of ``model``) while recording is on."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = unwrap(model)
        self.names = list(names)
        modules = dict(self.model.named_modules())
        self._handles = []
        self._active = False
        self.outputs: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name not in modules:
                raise KeyError(f"no module named {name!r}")
            self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, args, out):
            if not self._active:
                return
            if name in self.outputs:
                raise RuntimeError(
                    f"layer {name!r} ran twice in one recorded forward (shared module?); "
                    "guide it by an explicit mapping onto a module that runs once"
                )
            self.outputs[name] = first_tensor(out, name)

        return hook

    @contextlib.contextmanager
    def recording(self):
        """Clear previous outputs and record every selected layer during the block."""
        if not self._handles:
            raise RuntimeError("recorder is closed")
        self.outputs = {}
        self._active = True
        try:
            yield self.outputs
        finally:
            self._active = False

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs in ``names`` order; clears them (frees the references)."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the recorded forward")
        outs = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return outs

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
