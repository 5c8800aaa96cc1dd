"""Which layers are guided, and which guide layer each is aligned to.

Selection (:func:`select_layers`) accepts

* ``"auto"`` — the paper's set: Conv1d/2d/3d, Linear, RNN/LSTM/GRU, MultiheadAttention, and
  Hugging Face's ``Conv1D`` (GPT-2's projections: a Linear with transposed weight);
* a module type or a tuple of types;
* a list of module names (as in ``model.named_modules()``); entries may be glob patterns;
* a glob pattern (a string with ``*``, ``?`` or ``[``): ``*`` matches within one dotted name
  component, ``**`` across components, so ``"transformer.h.*"`` selects GPT-2's blocks and
  ``"model.layers.*"`` Llama's, not their sub-modules;
* a callable ``(name, module) -> bool``.

Wrapped models are unwrapped first (:func:`unwrap`): DDP / DataParallel (``.module``) and
``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), so names are the ones of the model you
wrote, without ``module.`` or ``_orig_mod.`` prefixes.

Layers are returned in **registration order** (the order of ``named_modules()``), which is what
"depth" means for the even spread. For models whose registration order differs from execution
order, pass names or an explicit mapping.

Mapping (:func:`map_layers`), with ``G`` guide layers and ``T`` target layers:

* even spread by depth: guide layer ``i`` → target layer ``floor(i*(T-1)/(G-1) + 1/2)`` (round
  half up, so ties do not depend on parity as with Python's ``round``);
  ``G == 1`` maps the one guide layer to the deepest target layer.
* ``G <= T``: every guide layer gets its own target layer (one-to-one, the step is >= 1).
* ``G > T`` (guide deeper): several guide layers land on the same target layer. The paper's code
  stored pairs in a dict keyed by target layer and so silently kept only the last guide layer per
  target layer. Here ``guide_deeper="all"`` (default) keeps **every** pair — a target layer is
  then aligned to several guide layers, each pair its own ``1 - CKA`` term — and
  ``guide_deeper="spread"`` instead spreads the target over the guide (target ``j`` → guide
  ``floor(j*(G-1)/(T-1) + 1/2)``), one pair per target layer, other guide layers unused.
* explicit: a dict ``{target_name: guide_name}`` or a list of ``(target_name, guide_name)``
  pairs (a list may repeat a target name for many-to-one).
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Callable, Iterable, Sequence, Union

from torch import nn

AUTO_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.RNNBase, nn.MultiheadAttention,
)

LayerSpec = Union[str, type, tuple, Sequence[str], Callable[[str, nn.Module], bool]]


def _unknown(name: str, known: Iterable[str], what: str) -> KeyError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {close}?" if close else ""
    return KeyError(f"unknown {what} layer {name!r}{hint} (it has {len(known)} named modules)")


def _is_compiled(model: nn.Module) -> bool:
    # torch._dynamo's OptimizedModule, recognised without importing torch._dynamo (slow import)
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose names users write: unwraps DDP / DataParallel (``.module``) and
    ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), in any nesting."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections), recognised by
    class name and module so ``transformers`` need not be installed or imported."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _auto(name: str, module: nn.Module) -> bool:
    return isinstance(module, AUTO_TYPES) or is_hf_conv1d(module)


def is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """Compile a dotted-name glob: ``**`` any run of characters, ``*`` any run without a dot,
    ``?`` one character other than a dot, ``[...]`` a character class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                raise ValueError(f"layer pattern {pattern!r}: unclosed '['")
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _match_pattern(pattern: str, names: Iterable[str], what: str) -> list[str]:
    rx = glob_regex(pattern)
    hits = [n for n in names if rx.match(n)]
    if not hits:
        raise ValueError(
            f"{what} layer pattern {pattern!r} matches no module ('*' stays within one dotted "
            "component; use '**' to cross them)"
        )
    return hits


def select_layers(model: nn.Module, spec: LayerSpec = "auto", *, what: str = "model") -> list[str]:
    """Names of the selected modules of ``model`` in registration order; raises on empty/unknown."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root is never a guided layer
    auto = isinstance(spec, str) and spec == "auto"
    if auto:
        spec = _auto
    if isinstance(spec, str) and is_pattern(spec):
        spec = [spec]
    if isinstance(spec, type) or (isinstance(spec, tuple) and spec and all(isinstance(s, type) for s in spec)):
        types = spec
        names = [n for n, m in modules.items() if isinstance(m, types)]
        desc = f"of type {spec}"
    elif callable(spec):
        names = [n for n, m in modules.items() if spec(n, m)]
        desc = (
            "of the 'auto' types (Conv, Linear, RNN, MultiheadAttention, HF Conv1D)"
            if auto else "matching the callable"
        )
    elif isinstance(spec, str):
        raise TypeError(
            f"{what} layers: a single name {spec!r}; pass a list of names, a glob pattern, or 'auto'"
        )
    else:
        explicit, matched = [], []
        for n in spec:
            if isinstance(n, str) and is_pattern(n):
                matched += _match_pattern(n, modules, what)  # overlaps between patterns are fine
            elif n not in modules:
                raise _unknown(n, modules, what)
            else:
                explicit.append(n)
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"{what} layers: duplicate names in {explicit}")
        order = {n: i for i, n in enumerate(modules)}
        names = sorted(set(explicit) | set(matched), key=order.__getitem__)
        desc = "from the given names"
    if not names:
        raise ValueError(f"{what} layer selection is empty: no module {desc}")
    return names


def _spread(i: int, src: int, dst: int) -> int:
    if src == 1:
        return dst - 1
    return math.floor(i * (dst - 1) / (src - 1) + 0.5)


def map_layers(
    target_names: Sequence[str],
    guide_names: Sequence[str],
    mapping: dict | Sequence[tuple[str, str]] | None = None,
    *,
    guide_deeper: str = "all",
) -> list[tuple[str, str]]:
    """``[(target_name, guide_name), ...]`` ordered by target depth (see module docstring)."""
    t_names, g_names = list(target_names), list(guide_names)
    if not t_names:
        raise ValueError("target layer selection is empty")
    if not g_names:
        raise ValueError("guide layer selection is empty")
    if mapping is not None:
        pairs = list(mapping.items()) if isinstance(mapping, dict) else [tuple(p) for p in mapping]
        if not pairs:
            raise ValueError("explicit mapping is empty")
        for t, g in pairs:
            if t not in t_names:
                raise _unknown(t, t_names, "target")
            if g not in g_names:
                raise _unknown(g, g_names, "guide")
        return pairs
    G, T = len(g_names), len(t_names)
    if G > T and guide_deeper == "spread":
        return [(t_names[j], g_names[_spread(j, T, G)]) for j in range(T)]
    if guide_deeper not in ("all", "spread"):
        raise ValueError(f"guide_deeper must be 'all' or 'spread', got {guide_deeper!r}")
    pairs = [(t_names[_spread(i, G, T)], g_names[i]) for i in range(G)]
    return pairs
