"""Typer command ``guidance-kernels similarity``."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer


def command(
    model_a: str = typer.Option("small_cnn", "--model-a", "-a",
                                help="rows: a built-in digits model (deep_fcn, small_cnn, shallow_fcn; "
                                     "kwargs as deep_fcn(depth=12)), 'module:callable', a pickled-module "
                                     "checkpoint, or ARCH@CHECKPOINT (state dict / trainer checkpoint)"),
    model_b: str = typer.Option("deep_fcn", "--model-b", "-b",
                                help="columns: same forms as --model-a; the same spec and seed as A "
                                     "compares A with itself (symmetric map, ones on the diagonal)"),
    seed_a: int = typer.Option(0, help="initialisation seed of model A (built-in / callable)"),
    seed_b: int = typer.Option(0, help="initialisation seed of model B"),
    data: str = typer.Option("digits", help="'digits' (all 1797 bundled images), 'digits-train', "
                                            "'digits-test', or a .pt / .npy tensor file of inputs"),
    limit: Optional[int] = typer.Option(None, help="use only the first N samples"),
    layers_a: str = typer.Option("auto", help="'auto' (Conv/Linear/RNN/attention) or comma-separated "
                                              "module names, glob patterns ('fc*') or class names ('ReLU')"),
    layers_b: str = typer.Option("auto", help="as --layers-a, for model B"),
    batch_size: int = typer.Option(256, help="samples per batch (>= 4); the map is the minibatch "
                                             "unbiased CKA, memory O(layers x batch^2)"),
    ragged: str = typer.Option("auto", help="short last batch: auto (keep if >= 4 samples), drop, include"),
    flatten: str = typer.Option("sample", help="'sample': (n, ...) -> (n, features); 'token': (n*T, D)"),
    device: str = typer.Option("auto", help="cpu, cuda, or auto"),
    amp: bool = typer.Option(False, "--amp", help="run the models under bf16 autocast"),
    backend: str = typer.Option("auto", help="Gram backend: auto, reference, triton, cuda"),
    pretrain_a: int = typer.Option(0, help="first train model A on the digits task for this many steps "
                                           "(e.g. a trained guide); 0: use it as built"),
    guide_steps: int = typer.Option(0, help="guidability report: A is the guide, B the target; maps on "
                                            "digits-test before and after this many guided steps on "
                                            "digits-train (0: off)"),
    alignment_only: bool = typer.Option(False, "--alignment-only",
                                        help="guided run on the guidance loss alone (no task loss)"),
    alpha: float = typer.Option(1.0, help="guidance weight for the guided run"),
    lr: float = typer.Option(1e-3, help="Adam learning rate for training runs"),
    out: str = typer.Option("runs/similarity", "--out", help="output folder"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars"),
) -> None:
    """Layer-by-layer CKA map of two models over a dataset; writes cka.json, cka.npy and a heatmap.

    The map is the minibatch unbiased linear CKA (Nguyen, Raghu & Kornblith 2021) of every layer of
    model A (rows) against every layer of model B (columns). With --guide-steps it also writes the
    guidability report: the map before and after a short guided run, with the trainer's layer
    mapping outlined."""
    import numpy as np
    import torch
    from rich.console import Console

    from guidance_kernels.similarity.capture import layer_cka
    from guidance_kernels.similarity.heatmap import plot_heatmap
    from guidance_kernels.similarity.loading import load_inputs, load_model

    console = Console()
    progress = not no_progress
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    os.makedirs(out, exist_ok=True)

    def fail(msg: str) -> None:
        console.print(f"[red]error:[/red] {msg}")
        raise typer.Exit(2)

    try:
        ma = load_model(model_a, seed=seed_a).to(dev)
        same = model_b.strip() == model_a.strip() and seed_b == seed_a and guide_steps == 0
        mb = ma if same else load_model(model_b, seed=seed_b).to(dev)
        x = load_inputs(data, limit=limit)
    except (ValueError, KeyError, FileNotFoundError, TypeError, AttributeError, ImportError) as e:
        fail(str(e))
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
        _guidability(ma, mb, common, guide_steps, alignment_only, alpha, lr, data, out, console,
                     progress, fail)
        return
    try:
        res = layer_cka(ma, None if same else mb, x, **common)
    except (ValueError, KeyError, TypeError) as e:
        fail(str(e))
    m = res.matrix.numpy()
    np.save(os.path.join(out, "cka.npy"), m)
    meta = res.to_dict()
    meta.update({"model_a_spec": model_a, "model_b_spec": model_b, "seed_a": seed_a, "seed_b": seed_b,
                 "data": data, "device": str(dev), "amp": amp})
    with open(os.path.join(out, "cka.json"), "w") as f:
        json.dump(meta, f, indent=1)
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


def _guidability(ma, mb, common, steps, alignment_only, alpha, lr, data, out, console, progress, fail):
    import numpy as np

    from guidance_kernels.similarity.guidability import guidability_report
    from guidance_kernels.similarity.heatmap import plot_before_after

    if not data.startswith("digits"):
        fail("--guide-steps trains on digits-train and maps on digits-test; use the Python API "
             "(guidance_kernels.similarity.guidability_report) for other data")
    from guidance_kernels.data import load_digits_tensors

    tr, te = load_digits_tensors()
    try:
        rep = guidability_report(
            ma, mb, tr, te, guide_layers=common["layers_a"], target_layers=common["layers_b"],
            steps=steps, lr=lr, alpha=alpha, task_loss=not alignment_only,
            cka_batch_size=common["batch_size"], progress=progress, console=console)
    except (ValueError, KeyError, TypeError) as e:
        fail(str(e))
    d = rep.to_dict()
    d.update({"guide": common["name_a"], "target": common["name_b"]})
    with open(os.path.join(out, "guidability.json"), "w") as f:
        json.dump(d, f, indent=1)
    np.save(os.path.join(out, "cka_before.npy"), rep.before.matrix.numpy())
    np.save(os.path.join(out, "cka_after.npy"), rep.after.matrix.numpy())
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
