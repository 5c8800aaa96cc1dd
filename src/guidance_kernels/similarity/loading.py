"""Models and datasets from command-line strings.

Model specs (``load_model``):

* a built-in digits model by name, optionally with keyword arguments:
  ``deep_fcn``, ``small_cnn``, ``shallow_fcn``, ``deep_fcn(depth=12, width=64)``
  (:data:`guidance_kernels.train.models.MODELS`; ``seed`` fixes the initialisation);
* ``package.module:callable`` or ``package.module:callable(k=v, ...)``: a callable returning an
  ``nn.Module`` (a class or a factory); a ``path/to/file.py:callable`` works too;
* a checkpoint file (``.pt``/``.pth``/``.ckpt``): either a whole pickled ``nn.Module``
  (``torch.save(model, path)``; only with ``trust_pickle=True``, see below), or ``ARCH@PATH``
  where ``ARCH`` is any spec above and ``PATH`` holds a state dict or the trainer's checkpoint
  (``{"model": state_dict, ...}``).

Safety: state dicts, trainer checkpoints and tensor files load with ``weights_only=True`` (a
crafted file cannot run code). A whole pickled module can only be loaded with
``weights_only=False``, which **runs code stored in the file**: it is refused unless
``trust_pickle=True`` (CLI: ``--trust-pickle``); pass it only for files you trust. Unreadable,
empty or corrupt files raise :class:`~guidance_kernels.files.FileLoadError` naming the file.

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

from guidance_kernels.files import FileLoadError, load_torch

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


def load_model(spec: str, *, seed: Optional[int] = 0, map_location: str = "cpu",
               trust_pickle: bool = False) -> nn.Module:
    """An ``nn.Module`` from a spec (see module doc). ``seed`` makes built-in / callable
    initialisations reproducible (ignored for checkpoints of whole modules). ``trust_pickle``
    allows whole pickled modules, which run code from the file: trusted files only."""
    spec = spec.strip()
    if "@" in spec:
        arch, path = spec.rsplit("@", 1)
        model = _build(arch, seed)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint {path!r}")
        state = load_torch(path, map_location=map_location, check=_state_dict)
        model.load_state_dict(_state_dict(state))
        return model
    if spec.lower().endswith(_CKPT_EXT):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"no checkpoint {spec!r}")
        if trust_pickle:
            obj = _load_trusted_pickle(spec, map_location)
        else:
            try:
                obj = load_torch(spec, map_location=map_location)
            except FileLoadError as e:
                if "weights_only" not in str(e):
                    raise
                raise FileLoadError(
                    f"{spec}: holds pickled objects (e.g. a whole nn.Module), which load only by "
                    f"running code from the file; if you trust it, pass --trust-pickle "
                    f"(trust_pickle=True), else save a state dict and use 'ARCH@{spec}'") from e
        if isinstance(obj, nn.Module):
            return obj
        raise ValueError(
            f"{spec!r} holds a {type(obj).__name__}, not a pickled nn.Module; for a state dict or a "
            f"trainer checkpoint say which architecture it belongs to: 'ARCH@{spec}' "
            f"(e.g. 'deep_fcn(depth=40)@{spec}')"
        )
    return _build(spec, seed)


def _load_trusted_pickle(path: str, map_location):
    """``torch.load(weights_only=False)``: RUNS CODE from the file. Trusted files only."""
    if os.path.getsize(path) == 0:
        raise FileLoadError(f"{path}: empty file (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: name the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileLoadError(f"{path}: cannot load the pickled module: {first}") from e


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

        if not os.path.isfile(s):
            raise FileNotFoundError(f"no data file {s!r}")
        try:
            arr = np.load(s, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise FileLoadError(f"{s}: not a readable .npy array: {e}") from e
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{s!r}: inputs must be numbers, got a {arr.dtype} array")
        x = torch.from_numpy(arr)
    elif s.lower().endswith(_CKPT_EXT):
        obj = load_torch(s, map_location="cpu")
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
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{spec!r}: inputs must be a tensor (N, ...) with a sample axis and at least "
                         f"one feature axis, got shape {shape} (one feature per sample: reshape to (N, 1))")
    if x.shape[0] < 4:
        raise ValueError(f"{spec!r}: {x.shape[0]} samples; the minibatch CKA needs at least 4")
    if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # integer inputs (token ids) stay as they are
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        x = x[:limit]
    return x
