"""Typer command ``guidance-kernels similarity``."""

from __future__ import annotations

import math
import os
from enum import Enum
from typing import Optional

import typer

from guidance_kernels.commands.options import check_backend, device_option


class Ragged(str, Enum):
    auto = "auto"
    drop = "drop"
    include = "include"


class Flatten(str, Enum):
    sample = "sample"
    token = "token"


def command(
    model_a: str = typer.Option("small_cnn", "--model-a", "-a",
                                help="rows: a built-in digits model (deep_fcn, small_cnn, shallow_fcn; "
                                     "kwargs as deep_fcn(depth=12)), 'module:callable', a pickled-module "
                                     "checkpoint (needs --trust-pickle), or ARCH@CHECKPOINT (state dict / "
                                     "trainer checkpoint)"),
    model_b: str = typer.Option("deep_fcn", "--model-b", "-b",
                                help="columns: same forms as --model-a; the same spec and seed as A "
                                     "compares A with itself (symmetric map, ones on the diagonal)"),
    seed_a: int = typer.Option(0, help="initialisation seed of model A (built-in / callable)"),
    seed_b: int = typer.Option(0, help="initialisation seed of model B"),
    data: str = typer.Option("digits", help="'digits' (all 1797 bundled images), 'digits-train', "
                                            "'digits-test', or a .pt / .npy tensor file of inputs"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N samples"),
    layers_a: str = typer.Option("auto", help="'auto' (Conv/Linear/RNN/attention) or comma-separated "
                                              "module names, glob patterns ('fc*') or class names ('ReLU')"),
    layers_b: str = typer.Option("auto", help="as --layers-a, for model B"),
    batch_size: int = typer.Option(256, min=4, help="samples per batch (>= 4); the map is the minibatch "
                                             "unbiased CKA, memory O(layers x batch^2)"),
    ragged: Ragged = typer.Option(Ragged.auto, help="short last batch: auto (keep if >= 4 samples), drop, include"),
    flatten: Flatten = typer.Option(Flatten.sample, help="'sample': (n, ...) -> (n, features); 'token': (n*T, D)"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto", callback=device_option),
    amp: bool = typer.Option(False, "--amp", help="run the models under bf16 autocast"),
    backend: str = typer.Option("auto", help="Gram backend: auto, reference, triton, cuda"),
    pretrain_a: int = typer.Option(0, min=0, help="first train model A on the digits task for this many steps "
                                           "(e.g. a trained guide); 0: use it as built"),
    guide_steps: int = typer.Option(0, min=0, help="guidability report: A is the guide, B the target; maps on "
                                            "digits-test before and after this many guided steps on "
                                            "digits-train (0: off)"),
    alignment_only: bool = typer.Option(False, "--alignment-only",
                                        help="guided run on the guidance loss alone (no task loss)"),
    alpha: float = typer.Option(1.0, help="guidance weight for the guided run"),
    lr: float = typer.Option(1e-3, min=0.0, help="Adam learning rate for training runs"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                      help="allow a model checkpoint that is a whole pickled nn.Module: "
                                           "loading it RUNS CODE stored in the file (torch.load with "
                                           "weights_only=False): use only for files you trust. State "
                                           "dicts (ARCH@CHECKPOINT) never need it"),
    out: str = typer.Option("runs/similarity", "--out", help="output folder"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars"),
) -> None:
    """Layer-by-layer CKA map of two models over a dataset; writes cka.json, cka.npy and a heatmap.

    The map is the minibatch unbiased linear CKA (Nguyen, Raghu & Kornblith 2021) of every layer of
    model A (rows) against every layer of model B (columns). With --guide-steps it also writes the
    guidability report: the map before and after a short guided run, with the trainer's layer
    mapping outlined."""
    import torch
    from rich.console import Console

    from guidance_kernels.files import write_json
    from guidance_kernels.similarity.capture import layer_cka
    from guidance_kernels.similarity.heatmap import plot_heatmap
    from guidance_kernels.similarity.loading import load_inputs, load_model

    console = Console()
    progress = not no_progress
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    check_backend(backend, dev)
    for opt, v in (("--alpha", alpha), ("--lr", lr)):
        if not math.isfinite(v) or (opt == "--lr" and v <= 0):
            raise typer.BadParameter(f"must be a finite number{' > 0' if opt == '--lr' else ''}, got {v}",
                                     param_hint=f"'{opt}'")
    if os.path.exists(out) and not os.path.isdir(out):
        raise typer.BadParameter(f"{out!r} exists and is not a folder", param_hint="'--out'")
    ragged, flatten = ragged.value, flatten.value
    if guide_steps > 0 and not data.startswith("digits"):
        raise typer.BadParameter("--guide-steps trains on digits-train and maps on digits-test; use the "
                                 "Python API (guidance_kernels.similarity.guidability_report) for other "
                                 "data", param_hint="'--data'")

    ma = load_model(model_a, seed=seed_a, trust_pickle=trust_pickle).to(dev)
    same = model_b.strip() == model_a.strip() and seed_b == seed_a and guide_steps == 0
    mb = ma if same else load_model(model_b, seed=seed_b, trust_pickle=trust_pickle).to(dev)
    x = load_inputs(data, limit=limit)
    name_a, name_b = _label(model_a), _label(model_b)
    if same:
        name_b = name_a

    if pretrain_a:
        from guidance_kernels.data import load_digits_tensors
        from guidance_kernels.train.trainer import TrainConfig, Trainer

        tr, te = load_digits_tensors()
        cfg = TrainConfig(steps=pretrain_a, batch_size=256, lr=lr, seed=seed_a, eval_every=pretrain_a,
                          progress=progress)
        h = Trainer(ma, tr, cfg, eval_data=te, name=f"training {name_a}").fit()
        console.print(f"{name_a} trained {pretrain_a} steps: digits-test accuracy {h.eval[-1]['acc']:.3f}")
        name_a = f"{name_a} (trained {pretrain_a} steps)"

    common = dict(layers_a=layers_a, layers_b=layers_b, batch_size=batch_size, ragged=ragged,
                  flatten=flatten, device=dev, amp=amp, backend=backend, progress=progress,
                  name_a=name_a, name_b=name_b, console=console)
    if guide_steps > 0:
        _guidability(ma, mb, common, guide_steps, alignment_only, alpha, lr, out, console, progress)
        return
    res = layer_cka(ma, None if same else mb, x, **common)
    m = res.matrix.numpy()
    save_npy(os.path.join(out, "cka.npy"), m)
    meta = res.to_dict()
    meta.update({"model_a_spec": model_a, "model_b_spec": model_b, "seed_a": seed_a, "seed_b": seed_b,
                 "data": data, "device": str(dev), "amp": amp})
    write_json(os.path.join(out, "cka.json"), meta)
    png = plot_heatmap(m, res.layers_a, res.layers_b, os.path.join(out, "cka.png"),
                       name_a=name_a, name_b=name_b,
                       title=f"linear CKA (minibatch unbiased, {res.samples} samples of {data})\n"
                             f"{name_a} vs {name_b}")
    console.print(f"{len(res.layers_a)} x {len(res.layers_b)} layers, {res.samples} samples in "
                  f"{res.batches} batches of {batch_size}"
                  + (f" ({res.dropped} dropped)" if res.dropped else "")
                  + f", {res.seconds:.1f} s")
    console.print(f"wrote {out}/cka.json, {out}/cka.npy, {png}")


def _label(spec: str) -> str:
    s = spec.strip()
    if "@" in s:
        s = s.split("@", 1)[0]
    s = os.path.basename(s) if s.lower().endswith((".pt", ".pth", ".ckpt", ".bin")) else s
    return s.split(":")[-1] if ":" in s else s


def save_npy(path: str, array) -> None:
    """``np.save`` to ``path`` atomically."""
    import numpy as np

    from guidance_kernels.files import atomic_write

    with atomic_write(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def _guidability(ma, mb, common, steps, alignment_only, alpha, lr, out, console, progress):
    from guidance_kernels.files import write_json
    from guidance_kernels.similarity.guidability import guidability_report
    from guidance_kernels.similarity.heatmap import plot_before_after
    from guidance_kernels.data import load_digits_tensors

    tr, te = load_digits_tensors()
    rep = guidability_report(
        ma, mb, tr, te, guide_layers=common["layers_a"], target_layers=common["layers_b"],
        steps=steps, lr=lr, alpha=alpha, task_loss=not alignment_only,
        cka_batch_size=common["batch_size"], progress=progress, console=console)
    d = rep.to_dict()
    d.update({"guide": common["name_a"], "target": common["name_b"]})
    write_json(os.path.join(out, "guidability.json"), d)
    save_npy(os.path.join(out, "cka_before.npy"), rep.before.matrix.numpy())
    save_npy(os.path.join(out, "cka_after.npy"), rep.after.matrix.numpy())
    what = "guidance only" if alignment_only else "task + guidance"
    png = plot_before_after(rep.before.matrix, rep.after.matrix, rep.guide_layers, rep.target_layers,
                            os.path.join(out, "guidability.png"), name_a=f"guide {common['name_a']}",
                            name_b=f"target {common['name_b']}", mapping=rep.cells,
                            title=f"guidability: {steps} guided steps ({what}, alpha={alpha}); "
                                  f"CKA on digits-test")
    from rich.table import Table

    t = Table(title="trainer's layer mapping: CKA before -> after")
    for c in ("target layer", "guide layer", "before", "after", "change"):
        t.add_column(c, justify="right")
    for r in rep.pair_rows():
        t.add_row(r["target"], r["guide"], f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['change']:+.3f}")
    console.print(t)
    s = rep.summary()
    acc = ""
    if rep.accuracy_before is not None:
        acc = f"; target accuracy {rep.accuracy_before:.3f} -> {rep.accuracy_after:.3f}"
    un = s["mean_change_unmapped"]
    console.print(f"mean change on mapped cells {s['mean_change_mapped']:+.3f}, elsewhere "
                  f"{'n/a' if un is None else format(un, '+.3f')}{acc} ({rep.seconds:.0f} s)")
    console.print(f"wrote {out}/guidability.json, cka_before.npy, cka_after.npy, {png}")
