"""One training run: the guide of a seed, or one arm of an experiment for one seed.

Each task module (``mnist1d``, ``copy_paste``, ``digits``) provides ``data(spec, seed)``,
``build_target``, ``build_guide``, ``target_layers``, ``guide_layers`` and ``task_loss``; models
return logits ``(N, classes)`` and labels reshape to ``(N,)``. Every arm of a seed starts from the
same target initialisation and sees the same data order (the trainer's order is a function of
the seed); the guide is trained once per seed and its weights are shared by that seed's arms.
"""

from __future__ import annotations

import importlib
import time

import torch
from torch import nn

from guidance_kernels.train.experiments.spec import ExperimentSpec, guide_of

TASKS = ("mnist1d", "copy_paste", "digits")


def task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"guidance_kernels.train.experiments.{name}")


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Share of correct argmax predictions (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    correct = 0
    for s in range(0, X.shape[0], chunk):
        out = model(X[s:s + chunk])
        correct += int((out.argmax(-1) == y[s:s + chunk].reshape(-1)).sum())
    model.train(was)
    return correct / y.numel()


def _trainer(spec, model, train, seed, name, guidance=None, kd=None, callback=None):
    from guidance_kernels.train.trainer import TrainConfig, Trainer

    guide = name == "guide"
    lr = spec.guide_lr if guide and spec.guide_lr is not None else spec.lr
    cfg = TrainConfig(steps=spec.guide_steps if guide else spec.steps,
                      batch_size=spec.batch_size, lr=lr, grad_clip=spec.grad_clip, seed=seed,
                      eval_every=0, log_every=50, progress=False)
    return Trainer(model, train, cfg, guidance=guidance, kd=kd, task_loss=task(spec.name).task_loss,
                   callback=callback, name=name)


def _fit(spec, model, train, test, seed, name, guidance=None, kd=None) -> tuple[list[dict], float]:
    """Train with the project's Trainer; returns the eval curve and the seconds taken."""
    curve: list[dict] = []
    warm = guidance.schedule.warmup_steps if guidance is not None else 0

    def ev(step: int, tr=None) -> None:
        total = warm + spec.steps
        if step == 0 or step == warm or step == total or (step > warm and (step - warm) % spec.eval_every == 0):
            curve.append({"step": step, "task_step": max(0, step - warm),
                          "acc": accuracy(model, *test)})

    tr = _trainer(spec, model, train, seed, name, guidance=guidance, kd=kd, callback=ev)
    ev(0)
    t0 = time.perf_counter()
    tr.fit()
    return curve, time.perf_counter() - t0


def split_val(spec: ExperimentSpec, train):
    """The guide's (train, validation) carve of the training set: the last
    ``min(guide_val, n // 5)`` samples of a fixed permutation (seed 0) are validation."""
    X, y = train
    n_val = min(spec.guide_val, X.shape[0] // 5)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    tr, va = perm[: X.shape[0] - n_val], perm[X.shape[0] - n_val:]
    return (X[tr], y[tr]), (X[va], y[va])


def guide_checks(spec: ExperimentSpec) -> list[int]:
    """Step counts at which the guide's validation accuracy is checked (ending at guide_steps)."""
    return sorted({c for c in spec.guide_checks if c < spec.guide_steps} | {spec.guide_steps})


def train_guide(spec: ExperimentSpec, seed: int) -> dict:
    """Train the seed's guide on the task: ``{"state", "acc", "seconds", "curve", "steps",
    "val_acc"}``. With ``spec.guide_val`` the guide trains on the training set minus a validation
    carve and stops at the first step count in :func:`guide_checks` where its validation accuracy
    reaches ``spec.guide_min_acc`` (``val_acc`` is None without a carve)."""
    mod = task(spec.name)
    train, test = mod.data(spec, seed)
    guide = mod.build_guide(spec, seed)
    t0 = time.perf_counter()
    if spec.guide_val > 0:
        train, val = split_val(spec, train)
    tr = _trainer(spec, guide, train, seed, "guide")
    curve, val_acc = [{"step": 0, "task_step": 0, "acc": accuracy(guide, *test)}], None
    for c in guide_checks(spec):
        tr.fit(max_steps=c)
        if spec.guide_val > 0:
            val_acc = accuracy(guide, *val)
            curve.append({"step": c, "task_step": c, "acc": accuracy(guide, *test), "val_acc": val_acc})
            if val_acc >= spec.guide_min_acc:
                break
    if spec.guide_val <= 0:
        curve.append({"step": tr.step, "task_step": tr.step, "acc": accuracy(guide, *test)})
    state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    return {"state": state, "acc": curve[-1]["acc"], "seconds": time.perf_counter() - t0,
            "curve": curve, "steps": tr.step, "val_acc": val_acc}


def run_arm(spec: ExperimentSpec, arm: str, seed: int, guide_state: dict | None) -> dict:
    """Train ``arm`` for ``seed``: ``{"arm", "seed", "final_acc", "curve", "seconds"}``."""
    from guidance_kernels.train.guidance import KD, Guidance
    from guidance_kernels.train.schedules import Continuous, FirstK, NoiseWarmup

    mod = task(spec.name)
    train, test = mod.data(spec, seed)
    target = mod.build_target(spec, seed)
    g = guide_of(arm)
    guidance = kd = None
    if g is not None:
        guide = mod.build_guide(spec, seed)
        if g == "trained":
            if guide_state is None:
                raise ValueError(f"arm {arm!r} needs the trained guide's weights")
            guide.load_state_dict(guide_state)
        guide.eval()
        for p in guide.parameters():
            p.requires_grad_(False)
        kind = arm.split("_")[0]
        if kind == "kd":
            kd = KD(guide, temperature=spec.kd_temperature, alpha=1.0)
        else:
            sched = {"guided": lambda: Continuous(spec.alpha),
                     "warmup": lambda: NoiseWarmup(spec.warmup_steps, spec.alpha),
                     "firstk": lambda: FirstK(spec.first_k, spec.alpha)}[kind]()
            guidance = Guidance(target, guide, target_layers=mod.target_layers(target),
                                guide_layers=mod.guide_layers(guide), alpha=sched, metric="cka")
    try:
        curve, sec = _fit(spec, target, train, test, seed, arm, guidance=guidance, kd=kd)
    finally:
        if guidance is not None:
            guidance.close()
    return {"arm": arm, "seed": seed, "final_acc": curve[-1]["acc"], "curve": curve, "seconds": sec}
