"""Models and datasets from command-line strings.

Model specs (``load_model``):

* a built-in digits model by name, optionally with keyword arguments:
  ``deep_fcn``, ``small_cnn``, ``shallow_fcn``, ``deep_fcn(depth=12, width=64)``
  (:data:`guidance_kernels.train.models.MODELS`; ``seed`` fixes the initialisation);
* ``package.module:callable`` or ``package.module:callable(k=v, ...)``: a callable returning an
  ``nn.Module`` (a class or a factory); a ``path/to/file.py:callable`` works too;
* a checkpoint file (``.pt``/``.pth``/``.ckpt``): either a whole pickled ``nn.Module``
  (``torch.save(model, path)``), or ``ARCH@PATH`` where ``ARCH`` is any spec above and ``PATH``
  holds a state dict or the trainer's checkpoint (``{"model": state_dict, ...}``).

Checkpoints are loaded with ``weights_only=False`` for whole modules (that runs pickled code:
load only files you trust) and ``weights_only=True`` for state dicts.

Dataset specs (``load_inputs``): ``digits`` (scikit-learn's bundled digits, standardised, all
1797 images as ``(N, 1, 8, 8)``), ``digits-train`` / ``digits-test`` (the demo's split), or a
tensor file: ``.pt`` (a tensor, a tuple/list whose first item is the inputs, or a dict with key
``x``/``inputs``/``images``) or ``.npy``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

__all__ = ["load_model", "load_inputs", "parse_call"]

_CKPT_EXT = (".pt", ".pth", ".ckpt", ".bin")


def parse_call(spec: str) -> tuple[str, dict]:
    """``"name(a=1, b='x')"`` -> ``("name", {"a": 1, "b": "x"})``; ``"name"`` -> ``("name", {})``."""
    spec = spec.strip()
    if not spec.endswith(")") or "(" not in spec:
        return spec, {}
    head, args = spec[: spec.index("(")], spec[spec.index("(") :]
    try:
        call = ast.parse(f"f{args}", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse the arguments in {spec!r}: {e}") from e
    if not isinstance(call, ast.Call) or call.args:
        raise ValueError(f"{spec!r}: only keyword arguments are supported, e.g. deep_fcn(depth=12)")
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except ValueError as e:
        raise ValueError(f"{spec!r}: argument values must be Python literals") from e
    return head.strip(), kwargs


def _import_callable(target: str):
    mod_name, _, attr = target.rpartition(":")
    if mod_name.endswith(".py") or os.sep in mod_name:
        if not os.path.exists(mod_name):
            raise FileNotFoundError(f"no such file {mod_name!r} (from {target!r})")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(mod_name)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target!r} is not callable")
    return obj


def _build(spec: str, seed: Optional[int]) -> nn.Module:
    from guidance_kernels.train.models import MODELS, build_model

    name, kwargs = parse_call(spec)
    if name in MODELS:
        return build_model(name, seed=seed, **kwargs)
    if ":" in name:
        fn = _import_callable(name)
        if seed is None:
            model = fn(**kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
        return model
    raise ValueError(
        f"unknown model {spec!r}: use a built-in name {sorted(MODELS)}, 'module:callable', "
        f"a checkpoint path ({'/'.join(_CKPT_EXT)}), or 'ARCH@CHECKPOINT'"
    )


def _state_dict(obj) -> dict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]  # the trainer's checkpoint
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError("the checkpoint holds neither a state dict nor a {'model': state_dict} checkpoint")


def load_model(spec: str, *, seed: Optional[int] = 0, map_location: str = "cpu") -> nn.Module:
    """An ``nn.Module`` from a spec (see module doc). ``seed`` makes built-in / callable
    initialisations reproducible (ignored for checkpoints of whole modules)."""
    spec = spec.strip()
    if "@" in spec:
        arch, path = spec.rsplit("@", 1)
        model = _build(arch, seed)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint {path!r}")
        state = _state_dict(torch.load(path, map_location=map_location, weights_only=True))
        model.load_state_dict(state)
        return model
    if spec.lower().endswith(_CKPT_EXT):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"no checkpoint {spec!r}")
        obj = torch.load(spec, map_location=map_location, weights_only=False)
        if isinstance(obj, nn.Module):
            return obj
        raise ValueError(
            f"{spec!r} holds a {type(obj).__name__}, not a pickled nn.Module; for a state dict or a "
            f"trainer checkpoint say which architecture it belongs to: 'ARCH@{spec}' "
            f"(e.g. 'deep_fcn(depth=40)@{spec}')"
        )
    return _build(spec, seed)


def _digits(which: str) -> torch.Tensor:
    from guidance_kernels.data import load_digits_tensors

    (xtr, _), (xte, _) = load_digits_tensors()
    if which == "train":
        return xtr
    if which == "test":
        return xte
    return torch.cat([xtr, xte])


def load_inputs(spec: str = "digits", *, limit: Optional[int] = None) -> torch.Tensor:
    """Model inputs ``(N, ...)`` from a dataset spec (see module doc); ``limit`` keeps the first N."""
    s = spec.strip()
    if s in ("digits", "digits-all"):
        x = _digits("all")
    elif s in ("digits-train", "digits-test"):
        x = _digits(s.split("-")[1])
    elif s.lower().endswith(".npy"):
        import numpy as np

        x = torch.from_numpy(np.load(s))
    elif s.lower().endswith(_CKPT_EXT):
        obj = torch.load(s, map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            x = obj
        elif isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
            x = obj[0]
        elif isinstance(obj, dict):
            key = next((k for k in ("x", "inputs", "input", "images", "data") if k in obj), None)
            if key is None:
                raise ValueError(f"{s!r}: a dict without an inputs key (x/inputs/images/data): {list(obj)}")
            x = obj[key]
        else:
            raise ValueError(f"{s!r}: cannot find the inputs in a {type(obj).__name__}")
    else:
        raise ValueError(f"unknown dataset {spec!r}: 'digits', 'digits-train', 'digits-test', or a .pt/.npy file")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{spec!r}: inputs must be a tensor (N, ...)")
    if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # integer inputs (token ids) stay as they are
    if limit is not None:
        x = x[:limit]
    return x
