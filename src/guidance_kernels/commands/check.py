"""`guidance-kernels check`: a self-check of every available backend against fp64 math."""

from __future__ import annotations

import typer
import torch

from guidance_kernels.commands.options import device_option_no_auto
from rich.console import Console
from rich.table import Table


def _tolerance(n: int, p: int) -> float:
    """fp32 rounding bound for an O(1) CKA of ``n`` samples and ``p`` features: ``4 k eps`` with
    ``k = max(n, p) + 2n`` terms per accumulated sum (products, then centering), the same model
    as the test suite's ``score_bound``; not a number tuned on one CPU."""
    return 4 * (max(n, p) + 2 * n) * torch.finfo(torch.float32).eps


def command(
    device: str = typer.Option("cpu", help="Device to run on (cpu, cuda, cuda:N).",
                               callback=device_option_no_auto),
    n: int = typer.Option(64, min=4, help="Samples per representation (>= 4)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Print CKA of a few representations per backend, next to an fp64 reference."""
    import guidance_kernels as gk
    from guidance_kernels.backends import get_backend

    console = Console()
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 48, generator=g)
    reps = {
        "conv-like (n,8,4,4)": base @ torch.randn(48, 128, generator=g),
        "rotated copy": base @ torch.linalg.qr(torch.randn(48, 48, generator=g))[0],
        "noisy copy": base + 0.5 * torch.randn(n, 48, generator=g),
        "independent": torch.randn(n, 32, generator=g),
    }
    reps["conv-like (n,8,4,4)"] = reps["conv-like (n,8,4,4)"].reshape(n, 8, 4, 4)
    table = Table(title=f"CKA(base, ·) on {device}, n = {n}")
    table.add_column("representation")
    table.add_column("fp64 reference", justify="right")
    backends = []
    dev = torch.device(device)
    for name in gk.list_backends():
        try:
            why = get_backend(name).available(dev)
        except RuntimeError as e:
            why = str(e)
        if why is None:
            backends.append(name)
            table.add_column(name, justify="right")
        else:
            console.print(f"[dim]backend {name!r} skipped: {why}[/dim]")
    from guidance_kernels.truth import cka as fp64_cka

    worst, tol = 0.0, 0.0
    for label, rep in reps.items():
        ref = float(fp64_cka(base, rep))
        tol = max(tol, _tolerance(n, max(base[0].numel(), rep[0].numel())))
        row = [label, f"{ref:.6f}"]
        for name in backends:
            got = float(gk.cka(base.to(dev), rep.to(dev), backend=name))
            worst = max(worst, abs(got - ref))
            row.append(f"{got:.6f}")
        table.add_row(*row)
    console.print(table)
    if dev.type == "cpu":
        from guidance_kernels.backends import cpu_gram

        isa = cpu_gram.isa()
        console.print(f"CPU kernels: {isa} (guidance_kernels._cpu)" if isa else
                      "CPU kernels: not in use (extension not built, no AVX-512 / AVX2, or GK_NO_CPU_KERNEL set); "
                      "MKL computes the products")
    ok = worst <= tol
    console.print(f"max |backend - fp64| = {worst:.2e} (fp32 bound {tol:.1e}): " + ("[green]OK[/green]" if ok else "[red]MISMATCH[/red]"))
    if not ok:
        raise typer.Exit(1)
