"""Option checks shared by the commands: devices that exist, backends that run there.

Each raises :class:`typer.BadParameter` (or ``ValueError``) naming the option; the CLI prints it
as one line with exit code 2."""

from __future__ import annotations

from typing import Optional

import typer


def check_device(value: str, allow_auto: bool = True) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (or ``auto``) that exists here; returns it unchanged."""
    import torch

    v = value.strip().lower()
    if allow_auto and v == "auto":
        return v
    try:
        dev = torch.device(v)
    except RuntimeError as e:
        raise typer.BadParameter(f"{value!r} is not a device (cpu, cuda, cuda:N{', auto' if allow_auto else ''})") from e
    if dev.type == "cpu":
        return v
    if dev.type != "cuda":
        raise typer.BadParameter(f"{value!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise typer.BadParameter(f"{value!r}: no CUDA GPU is available here (torch.cuda.is_available() "
                                 f"is False); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise typer.BadParameter(f"{value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return v


def device_option(value: str) -> str:
    """Typer callback for ``--device`` (auto allowed)."""
    return check_device(value, allow_auto=True)


def device_option_no_auto(value: str) -> str:
    """Typer callback for ``--device`` where ``auto`` is not offered."""
    return check_device(value, allow_auto=False)


def check_backend(name: str, device) -> None:
    """Raise ``typer.BadParameter`` when Gram backend ``name`` cannot run on ``device``."""
    if name == "auto":
        return
    import guidance_kernels as gk
    from guidance_kernels.backends import get_backend

    names = list(gk.list_backends())
    if name not in names:
        raise typer.BadParameter(f"unknown backend {name!r}; choose from {['auto', *names]}",
                                 param_hint="'--backend'")
    try:
        why: Optional[str] = get_backend(name).available(device)
    except RuntimeError as e:
        why = str(e)
    if why is not None:
        raise typer.BadParameter(f"{name!r} cannot run on {device}: {why}", param_hint="'--backend'")
