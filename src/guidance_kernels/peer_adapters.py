"""One adapter per PyPI CKA package ("peer"), used by the bench (``bench/baselines.py``: the
full-batch loss, forward only) and by the similarity comparison (``similarity/peers.py``: the
minibatch CKA map through each peer's model-level API). Peers are optional: ``why_unavailable``
says why one cannot run.

* ``ckatorch``: ``cka_base`` (fp64 inside, biased CKA) per pair; for the minibatch map its
  function ``cka_batch`` on activations stacked ``(batches, n, p)`` (its model-level
  ``CKA.__call__`` overwrites its accumulator per batch, and ``cka_batch`` wants 3-D input).
* ``pytorch-cka`` (import ``cka``): ``cka_from_features`` (debiased, clamped to [0, 1]); the map
  through ``compute_cka`` with forward hooks (unbiased HSIC accumulated over batches).
* ``torch-cka`` (import ``torch_cka``): ``CKA(...).compare`` (debiased, fp32, model + loader
  API only) for both.

Peers are given fp32 copies where they cannot take bf16 (the cast is inside the timed call).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Peer", "PEERS", "Replay"]


def _flat32(t: Tensor) -> Tensor:
    return t.flatten(1).float()


@contextlib.contextmanager
def _quiet():
    """Silence a peer's progress bars (stderr) and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class Replay(nn.Module):
    """A model whose layers ``layers.0 .. layers.{L-1}`` (``nn.Identity``) output the stored
    activations of the samples whose indices are the input (peers that only take models)."""

    def __init__(self, acts: Sequence[Tensor]):
        super().__init__()
        self.acts = list(acts)
        self.layers = nn.ModuleList(nn.Identity() for _ in self.acts)

    @property
    def names(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.acts))]

    def forward(self, idx: Tensor) -> Tensor:
        idx = idx.long()
        for layer, a in zip(self.layers, self.acts):
            layer(a[idx])
        return idx.float()


class _Emit(nn.Module):
    """A 'model' whose layer ``f`` outputs one stored activation, whatever the input (the whole
    batch at once: no index copy inside the timed call)."""

    def __init__(self, act: Tensor):
        super().__init__()
        self.act = act
        self.f = nn.Identity()

    def forward(self, _):
        return self.f(self.act)


class _OneBatch:
    """A one-batch 'data loader' (torch-cka reads ``dataset`` and ``len``)."""

    def __init__(self, batch):
        self.dataset = "bench-activations"
        self._batch = batch

    def __len__(self):
        return 1

    def __iter__(self):
        return iter([self._batch])


def _index_loader(n: int, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=False, drop_last=True)


class Peer:
    """A PyPI peer: ``dist`` (PyPI name), ``module`` (import name), ``attr`` (a name the right
    distribution's module has), ``metric`` (``"cka"`` or ``"debiased_cka"``: which fp64 truth its
    loss is checked against)."""

    dist = module = attr = metric = note = ""

    def why_unavailable(self) -> Optional[str]:
        if importlib.util.find_spec(self.module) is None:
            return f"not installed (pip install {self.dist})"
        try:
            mod = importlib.import_module(self.module)
        except Exception as e:  # noqa: BLE001 - a broken peer is a reason, not a crash
            return f"import failed: {type(e).__name__}: {e}"
        if not hasattr(mod, self.attr):
            return f"module {self.module!r} has no {self.attr!r}: not the {self.dist} distribution"
        return None

    def pair_loss(self, xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        """``sum_l (1 - CKA(xs[l], ys[l]))`` over whole batches, 0-dim, forward only."""
        total = 0.0
        for x, y in zip(xs, ys):
            total = total + (1.0 - self.pair_score(x, y))
        return torch.as_tensor(total)

    def pair_score(self, x: Tensor, y: Tensor):
        """The peer's CKA of one pair (a 0-dim tensor or a float)."""
        raise NotImplementedError

    def minibatch_map(self, acts_a, acts_b, batch_size: int, symmetric: bool = False) -> Tensor:
        """Minibatch CKA map ``(len(acts_a), len(acts_b))`` through the peer's model API."""
        raise NotImplementedError


class _Ckatorch(Peer):
    dist, module, attr, metric = "ckatorch", "ckatorch", "cka_base", "cka"
    note = "ckatorch.cka_base per pair (fp64 inside)"

    def pair_score(self, x, y):
        import ckatorch

        return ckatorch.cka_base(x.flatten(1), y.flatten(1))

    def minibatch_map(self, acts_a, acts_b, batch_size, symmetric=False):
        from ckatorch import cka_batch

        nb = acts_a[0].shape[0] // batch_size

        def stack(a):
            return a[: nb * batch_size].flatten(1).reshape(nb, batch_size, -1)

        sa, sb = [stack(a) for a in acts_a], [stack(b) for b in acts_b]
        out = torch.zeros(len(sa), len(sb), dtype=torch.float64)
        for i, x in enumerate(sa):
            for j, y in enumerate(sb):
                out[i, j] = cka_batch(x, y)
        return out


class _PytorchCka(Peer):
    dist, module, attr, metric = "pytorch-cka", "cka", "cka_from_features", "debiased_cka"
    note = "cka.cka_from_features per pair (debiased)"

    def pair_score(self, x, y):
        import cka  # the module of the pytorch-cka distribution

        return cka.cka_from_features(_flat32(x), _flat32(y))[0, 0]

    def minibatch_map(self, acts_a, acts_b, batch_size, symmetric=False):
        from cka import compute_cka

        ra = Replay(acts_a)
        rb = ra if symmetric else Replay(acts_b)
        loader = _index_loader(acts_a[0].shape[0], batch_size)
        return compute_cka(ra, rb, loader, layers=ra.names, model2_layers=rb.names, device="cpu",
                           progress=False)[0].double()


class _TorchCka(Peer):
    dist, module, attr, metric = "torch-cka", "torch_cka", "CKA", "debiased_cka"
    note = "torch_cka.CKA.compare per pair (debiased)"

    def pair_score(self, x, y):
        from torch_cka import CKA

        loader = _OneBatch((torch.zeros(1, device=x.device),))
        with _quiet():  # a tqdm bar per compare()
            m = CKA(_Emit(_flat32(x)), _Emit(_flat32(y)), "target", "guide", ["f"], ["f"], device=str(x.device))
            m.compare(loader, loader)
        return float(m.hsic_matrix[0, 0])

    def minibatch_map(self, acts_a, acts_b, batch_size, symmetric=False):
        from torch_cka import CKA

        ra = Replay(acts_a)
        rb = Replay(acts_b)  # torch-cka keeps one feature dict per model: give it two objects
        with _quiet():
            c = CKA(ra, rb, model1_name="A", model2_name="B", model1_layers=ra.names,
                    model2_layers=rb.names, device="cpu")
            c.compare(_index_loader(acts_a[0].shape[0], batch_size))
        return c.export()["CKA"].double()


# PyPI name -> adapter, in report order
PEERS: dict[str, Peer] = {p.dist: p for p in (_Ckatorch(), _PytorchCka(), _TorchCka())}
