"""One figure per experiment: test-accuracy learning curves, one panel per arm family.

Panels: alone vs guidance (continuous, first-K), alone vs KD, alone vs noise warm-up. Thin lines
are seeds, thick lines their mean; the dashed grey line is chance. The x axis is the task step
(noise warm-up steps are not shown; the warm-up arm starts at task step 0 after them).
"""

from __future__ import annotations

COLORS = {"alone": "black", "guided_trained": "tab:blue", "guided_untrained": "tab:orange",
          "kd_trained": "tab:green", "kd_untrained": "tab:red", "firstk_trained": "tab:purple",
          "firstk_untrained": "tab:brown", "warmup_trained": "tab:cyan", "warmup_untrained": "tab:olive"}


def _panels(arms) -> list[tuple[str, list[str]]]:
    fam = [("guidance (continuous / first K steps)", ("guided", "firstk")), ("KD baselines", ("kd",)),
           ("noise warm-up, then task only", ("warmup",))]
    out = []
    for title, kinds in fam:
        sel = [a for a in arms if a.split("_")[0] in kinds]
        if sel:
            out.append((title, ["alone"] + sel if "alone" in arms else sel))
    return out


def plot_experiment(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from guidance_kernels.files import save_figure

    sp = summary["spec"]
    panels = _panels(list(summary["final_acc"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), sharey=True, squeeze=False)
    for ax, (title, arms) in zip(axes[0], panels):
        for arm in arms:
            runs = [r for r in summary["runs"] if r["arm"] == arm]
            if not runs:
                continue
            c = COLORS.get(arm, "grey")
            curves = []
            for r in runs:
                pts = {}
                for e in r["curve"]:  # the last point per task step (after the warm-up)
                    pts[e["task_step"]] = e["acc"]
                xs = sorted(pts)
                curves.append([pts[k] for k in xs])
                ax.plot(xs, [100 * v for v in curves[-1]], color=c, lw=0.6, alpha=0.35)
            n = min(len(v) for v in curves)
            m = 100 * np.mean([v[:n] for v in curves], axis=0)
            ax.plot(xs[:n], m, color=c, lw=2.2, label=f"{arm} ({m[-1]:.1f} %)")
        ax.axhline(100 * sp["chance"], color="grey", ls="--", lw=1, label=f"chance ({100 * sp['chance']:.1f} %)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("task step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle(f"{summary['title']} — {len(summary['seeds'])} seed(s): thin = seeds, thick = mean",
                 fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
