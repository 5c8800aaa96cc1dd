"""Run two models over a dataset and accumulate the layer-by-layer minibatch CKA map.

Layers are captured with the trainer's forward hooks
(:class:`guidance_kernels.train.hooks.ActivationRecorder`) and selected with
:func:`guidance_kernels.train.mapping.select_layers`, so the names and the order are the ones the
trainer uses (registration order). A string selection (the CLI's) is ``"auto"`` (Conv, Linear,
RNN, attention modules) or a comma-separated list whose entries are module names, glob patterns
over names (``"fc*"``, ``"layer?.conv1"``) or module class names (``"Linear"``, ``"ReLU"``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from guidance_kernels.similarity.minibatch import MIN_BATCH, MinibatchCKA
from guidance_kernels.train.guidance import flatten_activation
from guidance_kernels.train.hooks import ActivationRecorder
from guidance_kernels.train.mapping import select_layers, unwrap

__all__ = ["SimilarityResult", "layer_cka", "resolve_layers", "batches_of"]


# --------------------------------------------------------------------------- layer selection
def resolve_layers(model: nn.Module, spec: Any = "auto", *, what: str = "model") -> list[str]:
    """Module names of ``model`` selected by ``spec`` (see module doc), in registration order."""
    if not isinstance(spec, str) or spec == "auto":
        return select_layers(model, spec, what=what)
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError(f"{what} layer selection {spec!r} is empty")
    modules = [(n, m) for n, m in unwrap(model).named_modules() if n]

    def hit(entry: str, name: str, module: nn.Module) -> bool:
        return name == entry or fnmatch.fnmatchcase(name, entry) or type(module).__name__ == entry

    for e in entries:
        if not any(hit(e, n, m) for n, m in modules):
            import difflib

            close = difflib.get_close_matches(e, [n for n, _ in modules] +
                                              sorted({type(m).__name__ for _, m in modules}), n=4)
            hint = f"; close: {close}" if close else ""
            raise KeyError(f"{what} layer selection: {e!r} matches no module name, pattern or "
                           f"class name{hint}")
    return select_layers(model, lambda n, m: any(hit(e, n, m) for e in entries), what=what)


# --------------------------------------------------------------------------- data
def _inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("x", "input", "inputs", "images", "image", "pixel_values"):
            if k in batch:
                return batch[k]
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}")


def batches_of(data: Any, batch_size: int, ragged: str = "auto") -> tuple[Iterator[Tensor], Optional[int], int]:
    """``(iterator over input batches, number of batches or None, samples dropped)``.

    ``data``: a tensor ``(N, ...)``, a tuple ``(X, y, ...)`` (X is used), or an iterable of
    batches (tensors, tuples, dicts; e.g. a DataLoader: its batching is used as is).
    ``ragged``: what to do with a last batch smaller than ``batch_size`` (tensor data) or than 4
    samples (iterables): ``"auto"`` includes it when it has >= 4 samples and drops it otherwise,
    ``"drop"`` always drops it, ``"include"`` always includes it (an error below 4 samples)."""
    if ragged not in ("auto", "drop", "include"):
        raise ValueError(f"ragged must be 'auto', 'drop' or 'include', got {ragged!r}")
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor) and not isinstance(data, Tensor):
        if len(data) <= 3 and all(isinstance(t, Tensor) and t.shape[0] == data[0].shape[0] for t in data):
            data = data[0]
    if isinstance(data, Tensor):
        if batch_size < MIN_BATCH:
            raise ValueError(f"batch_size must be >= {MIN_BATCH} (unbiased CKA), got {batch_size}")
        N = data.shape[0]
        full, rest = divmod(N, batch_size)
        keep_rest = rest > 0 and (ragged == "include" or (ragged == "auto" and rest >= MIN_BATCH))
        if keep_rest and rest < MIN_BATCH:
            raise ValueError(f"ragged='include' but the last batch has {rest} < {MIN_BATCH} samples; "
                             f"use ragged='drop' or a batch size that leaves >= {MIN_BATCH}")
        count = full + (1 if keep_rest else 0)
        if count == 0:
            raise ValueError(f"{N} samples make no batch of >= {MIN_BATCH} (batch_size {batch_size})")
        dropped = 0 if keep_rest else rest
        return (data[i * batch_size:(i + 1) * batch_size] for i in range(count)), count, dropped

    info = {"dropped": 0}
    try:
        count = len(data)  # type: ignore[arg-type]
    except TypeError:
        count = None

    def gen():
        it = iter(data)
        try:
            cur = _inputs(next(it))
        except StopIteration:
            return
        first_n = cur.shape[0]
        for nxt in it:
            yield cur
            cur = _inputs(nxt)
        last_short = cur.shape[0] < first_n
        if last_short and (ragged == "drop" or (ragged == "auto" and cur.shape[0] < MIN_BATCH)):
            info["dropped"] = cur.shape[0]
            return
        yield cur

    return gen(), count, info  # type: ignore[return-value]


# --------------------------------------------------------------------------- result
@dataclass
class SimilarityResult:
    matrix: Tensor                 # (L_A, L_B) fp64 on the CPU
    layers_a: list[str]
    layers_b: list[str]
    name_a: str = "A"
    name_b: str = "B"
    samples: int = 0
    batches: int = 0
    batch_size: int = 0
    dropped: int = 0
    symmetric: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "estimator": "minibatch unbiased linear CKA (Nguyen, Raghu & Kornblith 2021): "
                         "sum_b HSIC_u(K_b, L_b) / sqrt(sum_b HSIC_u(K_b, K_b) * sum_b HSIC_u(L_b, L_b))",
            "model_a": self.name_a, "model_b": self.name_b,
            "layers_a": self.layers_a, "layers_b": self.layers_b,
            "rows": "layers_a", "columns": "layers_b",
            "matrix": self.matrix.tolist(),
            "samples": self.samples, "batches": self.batches, "batch_size": self.batch_size,
            "dropped_samples": self.dropped, "symmetric": self.symmetric,
            "seconds": self.seconds, **self.extra,
        }


# --------------------------------------------------------------------------- main entry
@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(models, states):
            m.train(s)


def layer_cka(
    model_a: nn.Module,
    model_b: Optional[nn.Module],
    data: Any,
    *,
    layers_a: Any = "auto",
    layers_b: Any = "auto",
    batch_size: int = 256,
    ragged: str = "auto",
    flatten: str = "sample",
    device: Optional[torch.device | str] = None,
    amp: bool = False,
    center_dtype: torch.dtype = torch.float64,
    backend: str = "auto",
    progress: bool = False,
    name_a: str = "A",
    name_b: str = "B",
    console=None,
) -> SimilarityResult:
    """Layer-by-layer minibatch CKA of ``model_a`` (rows) against ``model_b`` (columns) over
    ``data`` (see :func:`batches_of`). ``model_b=None`` (or the same module with the same layer
    selection) compares A with itself: one forward per batch, an exactly symmetric map with ones
    on the diagonal. Models run in eval mode under ``no_grad`` (``amp=True``: bf16 autocast);
    their training flags are restored afterwards."""
    t0 = time.perf_counter()
    same_model = model_b is None or model_b is model_a
    mb = model_a if model_b is None else model_b
    names_a = resolve_layers(model_a, layers_a, what=name_a)
    names_b = names_a if model_b is None else resolve_layers(mb, layers_b, what=name_b)
    symmetric = same_model and names_a == names_b
    if device is None:
        p = next(iter(model_a.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)

    if same_model:
        union = list(dict.fromkeys(names_a + names_b))
        rec_a = ActivationRecorder(model_a, union)
        rec_b = None
    else:
        rec_a = ActivationRecorder(model_a, names_a)
        rec_b = ActivationRecorder(mb, names_b)
    acc = MinibatchCKA(len(names_a), None if symmetric else len(names_b),
                       center_dtype=center_dtype, backend=backend)
    it, count, dropped = batches_of(data, batch_size, ragged)

    bar = contextlib.nullcontext()
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("batches"), TimeElapsedColumn(), console=console, transient=False)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext())
    try:
        with bar as prog, _eval_mode(model_a, mb), torch.no_grad():
            task = prog.add_task(f"CKA {name_a} x {name_b}", total=count) if progress else None
            for x in it:
                if x.shape[0] < MIN_BATCH:
                    raise ValueError(
                        f"a batch of {x.shape[0]} samples: minibatch CKA needs >= {MIN_BATCH} per batch "
                        "(use ragged='drop' for a short last batch, or a larger batch size)")
                x = x.to(device)
                with autocast:
                    with rec_a.recording():
                        model_a(x)
                    acts_a = dict(zip(rec_a.names, rec_a.take()))
                    if rec_b is not None:
                        with rec_b.recording():
                            mb(x)
                        acts_b = dict(zip(rec_b.names, rec_b.take()))
                    else:
                        acts_b = acts_a
                xs = [flatten_activation(acts_a[n], flatten) for n in names_a]
                ys = None if symmetric else [flatten_activation(acts_b[n], flatten) for n in names_b]
                acc.update(xs, ys)
                del xs, ys, acts_a, acts_b
                if progress:
                    prog.advance(task, 1)
    finally:
        rec_a.close()
        if rec_b is not None:
            rec_b.close()
    if not isinstance(dropped, int):
        dropped = dropped["dropped"]
    if acc.batches == 0:
        raise ValueError("no batch with >= 4 samples in the data")
    matrix = acc.compute().to("cpu", torch.float64)
    return SimilarityResult(
        matrix=matrix, layers_a=names_a, layers_b=names_b, name_a=name_a, name_b=name_b,
        samples=acc.samples, batches=acc.batches, batch_size=batch_size, dropped=dropped,
        symmetric=symmetric, seconds=time.perf_counter() - t0,
    )
