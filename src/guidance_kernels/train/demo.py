"""The paper's three claims on scikit-learn's digits (8x8, 10 classes, bundled: no download).

Arms (each trained from the same seeded FCN initialisation, same data order, per seed):

* ``fcn_alone``            deep plain FCN, task loss only
* ``guided_trained``       + CKA guidance from a small CNN trained on the task (continuous)
* ``guided_untrained``     + CKA guidance from the same CNN architecture, untrained (continuous)
* ``kd_untrained``         + KD from the untrained CNN (the baseline for claim b)
* ``kd_trained``           + KD from the trained CNN (context: KD with a useful teacher)
* ``warmup_trained``       noise warm-up (K steps, guidance alone on N(0,1) inputs), then task only
* ``warmup_untrained``     the same with the untrained guide
* ``*_default_init``       reference rows with PyTorch's default Linear init instead of He init

The target is a 40-layer plain ReLU FCN (width 64) with He-normal init and zero biases, the
standard init for deep ReLU nets. With PyTorch's default Linear init the input signal vanishes
under the biases (relative variation ~3e-5 by layer 27, ~1e-7 by layer 53): task gradients no
longer reach the early layers, while CKA, being scale-invariant, still sees (and gives large
gradients to) the tiny input-dependent part of the deep layers. The two ``*_default_init`` rows
show what that gives.

Claims and how they are judged (fixed before looking at the numbers; final test accuracy at the
last step, mean ± std over seeds; "clearly above" = difference of means > 0.05 and > 2 standard
errors of the difference, with one seed only the 0.05 margin):

(a) ``fcn_alone`` is near chance (mean < 0.20; chance is 0.10) and ``guided_trained`` is clearly
    above it.
(b) ``guided_untrained`` is clearly above ``fcn_alone`` while ``kd_untrained`` is not.
(c) for each guide, the noise warm-up recovers most (>= 50 %) of the gain of continuous guidance:
    ``(warmup - alone) / (continuous - alone) >= 0.5`` (only judged when the continuous gain is
    clearly there).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

ARMS = (
    "fcn_alone",
    "guided_trained",
    "guided_untrained",
    "kd_untrained",
    "kd_trained",
    "warmup_trained",
    "warmup_untrained",
    "fcn_alone_default_init",
    "guided_trained_default_init",
)


@dataclass
class DemoConfig:
    seeds: int = 5
    depth: int = 40            # Linear layers in the target FCN
    width: int = 64
    steps: int = 300           # task steps per arm (batch 256: ~57 epochs of 1347 samples)
    batch_size: int = 256      # paper default
    lr: float = 1e-3           # Adam, paper default optimizer
    alpha: float = 1.0         # paper default, sum over pairs
    warmup_steps: int = 50     # noise warm-up length ("short": 1/6 of the task steps)
    kd_temperature: float = 4.0
    kd_alpha: float = 1.0
    guide_steps: int = 300     # training of the CNN guide
    eval_every: int = 25
    test_size: float = 0.25
    workers: int = 2


# --------------------------------------------------------------------------- data
def load_digits_tensors(test_size: float = 0.25, split_seed: int = 0):
    """Standardised digits as ``(n, 1, 8, 8)`` float32; fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = d.images.astype("float32") / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=test_size,
                                          random_state=split_seed, stratify=d.target)
    mu, sd = Xtr.mean(), Xtr.std()
    f = lambda a: torch.from_numpy((a - mu) / sd)[:, None].contiguous()
    return (f(Xtr), torch.from_numpy(ytr).long()), (f(Xte), torch.from_numpy(yte).long())


# --------------------------------------------------------------------------- one run
def _guide(seed: int, state=None) -> nn.Module:
    from guidance_kernels.train.models import build_model

    m = build_model("small_cnn", seed=10_000 + seed)
    if state is not None:
        m.load_state_dict(state)
    m.eval()
    return m


def _train_guide(cfg: DemoConfig, seed: int, train, test):
    from guidance_kernels.train.trainer import TrainConfig, Trainer

    m = _guide(seed)
    tc = TrainConfig(steps=cfg.guide_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                     eval_every=cfg.eval_every, progress=False)
    tr = Trainer(m, train, tc, eval_data=test, name=f"guide_s{seed}")
    h = tr.fit()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, h.eval[-1]["acc"]


def run_arm(cfg: DemoConfig, arm: str, seed: int, guide_state) -> dict:
    """Train one arm for one seed; returns its eval curve and final accuracy."""
    from guidance_kernels.train.guidance import KD, Guidance
    from guidance_kernels.train.models import build_model
    from guidance_kernels.train.schedules import Continuous, NoiseWarmup
    from guidance_kernels.train.trainer import TrainConfig, Trainer

    train, test = load_digits_tensors(cfg.test_size)
    init = "default" if arm.endswith("_default_init") else "kaiming"
    base = arm.removesuffix("_default_init")
    target = build_model("deep_fcn", seed=seed, depth=cfg.depth, width=cfg.width, init=init)
    trained = base.endswith("_trained")
    guide = _guide(seed, guide_state if trained else None)
    guidance = kd = None
    if base.startswith(("guided", "warmup")):
        sched = Continuous(cfg.alpha) if base.startswith("guided") else NoiseWarmup(cfg.warmup_steps, cfg.alpha)
        guidance = Guidance(target, guide, target_layers=nn.Linear,
                            guide_layers=(nn.Conv2d, nn.Linear), alpha=sched, metric="cka")
    elif base.startswith("kd"):
        kd = KD(guide, temperature=cfg.kd_temperature, alpha=cfg.kd_alpha)
    tc = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                     eval_every=cfg.eval_every, progress=False)
    tr = Trainer(target, train, tc, guidance=guidance, kd=kd, eval_data=test, name=f"{arm}_s{seed}")
    h = tr.fit()
    if guidance is not None:
        guidance.close()
    return {
        "arm": arm, "seed": seed, "final_acc": h.eval[-1]["acc"], "seconds": tr.elapsed,
        "eval": [e for e in h.eval if e["step"] >= tr.warmup],  # task phase (plus its start)
        "warmup_eval": [e for e in h.eval if e["step"] <= tr.warmup] if tr.warmup else [],
        "task_loss_every_10": h.task[::10],
        "guidance_loss_every_10": h.guidance[::10],
    }


def _job(args):
    kind, cfg, arm, seed, state = args
    torch.set_num_threads(1)  # tiny matrices: one thread per process beats two contended threads
    if kind == "guide":
        train, test = load_digits_tensors(cfg.test_size)
        st, acc = _train_guide(cfg, seed, train, test)
        return {"kind": "guide", "seed": seed, "state": st, "acc": acc}
    return {"kind": "arm", **run_arm(cfg, arm, seed, state)}


# --------------------------------------------------------------------------- statistics
def _stats(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, sd


def _clearly_above(a: list[float], b: list[float]) -> tuple[bool, float, float]:
    """(a clearly above b, difference of means, 2 standard errors or nan)."""
    ma, sa = _stats(a)
    mb, sb = _stats(b)
    d = ma - mb
    if len(a) < 2:
        return d > 0.05, d, float("nan")
    se2 = 2 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return d > 0.05 and d > se2, d, se2


def judge(acc: dict[str, list[float]], n_seeds: int) -> list[dict]:
    out = []
    alone_m, _ = _stats(acc["fcn_alone"])
    ok_g, d_g, se_g = _clearly_above(acc["guided_trained"], acc["fcn_alone"])
    near = alone_m < 0.20
    out.append({
        "claim": "a", "holds": bool(near and ok_g),
        "text": (f"(a) deep FCN alone: {alone_m:.3f} ({'near' if near else 'NOT near'} chance 0.10); "
                 f"guided by trained CNN: {'+' if d_g >= 0 else ''}{d_g:.3f} vs alone "
                 f"(2 s.e. {se_g:.3f}) -> {'clearly above' if ok_g else 'NOT clearly above'}"),
    })
    ok_u, d_u, se_u = _clearly_above(acc["guided_untrained"], acc["fcn_alone"])
    ok_k, d_k, se_k = _clearly_above(acc["kd_untrained"], acc["fcn_alone"])
    out.append({
        "claim": "b", "holds": bool(ok_u and not ok_k),
        "text": (f"(b) untrained guide: guidance {d_u:+.3f} vs alone (2 s.e. {se_u:.3f}, "
                 f"{'clearly above' if ok_u else 'NOT clearly above'}); KD {d_k:+.3f} "
                 f"(2 s.e. {se_k:.3f}, {'clearly above' if ok_k else 'not clearly above'})"),
    })
    for g in ("trained", "untrained"):
        ok_c, d_c, _ = _clearly_above(acc[f"guided_{g}"], acc["fcn_alone"])
        d_w = _stats(acc[f"warmup_{g}"])[0] - alone_m
        frac = d_w / d_c if d_c > 0 else float("nan")
        holds = bool(ok_c and frac >= 0.5)
        judged = "" if ok_c else " (not judged: continuous guidance gives no clear gain)"
        out.append({
            "claim": f"c_{g}", "holds": holds if ok_c else None, "recovered": frac,
            "text": (f"(c) {g} guide: noise warm-up gain {d_w:+.3f} vs continuous {d_c:+.3f} -> "
                     f"recovers {frac:.0%} of the gain{judged}"),
        })
    if acc.get("fcn_alone_default_init") and acc.get("guided_trained_default_init"):
        ma = _stats(acc["fcn_alone_default_init"])[0]
        ok_d, d_d, se_d = _clearly_above(acc["guided_trained_default_init"], acc["fcn_alone_default_init"])
        out.append({
            "claim": "a_default_init", "holds": bool(ma < 0.20 and ok_d),
            "text": (f"(a, PyTorch default init) FCN alone: {ma:.3f}; guided by trained CNN: {d_d:+.3f} "
                     f"(2 s.e. {se_d:.3f}) -> {'clearly above' if ok_d else 'NOT clearly above'}"),
        })
    return out


# --------------------------------------------------------------------------- plot
def plot(results: list[dict], path: str, cfg: DemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, arm in enumerate(ARMS):
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        steps = [e["task_step"] for e in runs[0]["eval"]]
        curves = torch.tensor([[e["acc"] for e in r["eval"]] for r in runs])
        m = curves.mean(0)
        style = "--" if arm.startswith("kd") else (":" if arm.startswith("warmup") else "-")
        lw = 0.8 if arm.endswith("_default_init") else 1.6
        ax.plot(steps, m, style, label=arm, color=f"C{i}", lw=lw)
        if len(runs) > 1:
            s = curves.std(0)
            ax.fill_between(steps, m - s, m + s, color=f"C{i}", alpha=0.15)
    ax.axhline(0.1, color="grey", lw=0.8, ls="-.", label="chance")
    ax.set_xlabel("task step (noise warm-up steps not shown)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    n = len({r["seed"] for r in results})
    ax.set_title(f"digits: {cfg.depth}-layer plain ReLU FCN (He init unless noted), mean ± std, {n} seed(s)",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def run_demo(cfg: DemoConfig, out_dir: str, console=None, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = console or Console()
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    seeds = list(range(cfg.seeds))
    workers = max(1, min(cfg.workers, os.cpu_count() or 1))
    cost = {"guide": cfg.guide_steps, "arm": cfg.steps}

    def execute(jobs, prog, task):
        results = []
        if workers == 1:
            for j in jobs:
                results.append(_job(j))
                prog.advance(task, 1)
            return results
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(_job, jobs):
                results.append(r)
                prog.advance(task, 1)
        return results

    n_jobs = len(seeds) * (1 + len(ARMS))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), "{task.completed}/{task.total} runs",
                  TimeElapsedColumn(), console=console, disable=not progress) as prog:
        task = prog.add_task("training guides", total=n_jobs)
        guides = execute([("guide", cfg, None, s, None) for s in seeds], prog, task)
        gstate = {g["seed"]: g["state"] for g in guides}
        gacc = {g["seed"]: g["acc"] for g in guides}
        prog.update(task, description=f"training {len(ARMS)} arms x {len(seeds)} seeds")
        jobs = [("arm", cfg, arm, s, gstate[s]) for s in seeds for arm in ARMS]
        results = execute(jobs, prog, task)
    results.sort(key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
    acc = {a: [r["final_acc"] for r in results if r["arm"] == a] for a in ARMS}
    verdicts = judge(acc, len(seeds))
    elapsed = time.perf_counter() - t0

    table = Table(title=f"digits, final test accuracy ({len(seeds)} seed(s), {cfg.steps} task steps)")
    table.add_column("arm")
    table.add_column("test acc (mean ± std)", justify="right")
    table.add_column("per seed", justify="left")
    table.add_column("last 3 evals (mean ± std)", justify="right")
    last3 = {a: [sum(e["acc"] for e in r["eval"][-3:]) / len(r["eval"][-3:])
                 for r in results if r["arm"] == a] for a in ARMS}
    gm, gs = _stats(list(gacc.values()))
    table.add_row("[dim]small_cnn guide itself[/dim]", f"{gm:.3f} ± {gs:.3f}",
                  " ".join(f"{gacc[s]:.2f}" for s in seeds), "")
    for a in ARMS:
        m, s = _stats(acc[a])
        m3, s3 = _stats(last3[a])
        table.add_row(a, f"{m:.3f} ± {s:.3f}", " ".join(f"{v:.2f}" for v in acc[a]), f"{m3:.3f} ± {s3:.3f}")
    console.print(table)
    console.print("Verdicts use the final-step accuracy (fixed in advance); the last column, the mean of "
                  f"the last 3 evaluations ({2 * cfg.eval_every} steps), shows how much one step's noise moves it.")
    for v in verdicts:
        mark = {True: "[green]holds[/green]", False: "[red]does NOT hold[/red]", None: "[yellow]not judged[/yellow]"}[v["holds"]]
        console.print(f"{v['text']}  => {mark}")
    plot_path = os.path.join(out_dir, "curves.png")
    plot(results, plot_path, cfg)
    summary = {
        "config": asdict(cfg),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.platform()}; {os.cpu_count()} CPU(s); torch {torch.__version__}",
        "seconds": elapsed,
        "guide_acc": [gacc[s] for s in seeds],
        "final_acc": acc,
        "last3_acc": last3,
        "summary": {a: dict(zip(("mean", "std"), _stats(acc[a]))) for a in ARMS},
        "verdicts": verdicts,
        "runs": results,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    console.print(f"wrote {out_dir}/results.json and {plot_path}  ({elapsed:.0f} s, {workers} worker(s))")
    console.print(f"hyperparameters: {asdict(cfg)}")
    return summary
