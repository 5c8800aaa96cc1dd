"""guidance-kernels: fused CKA / Procrustes kernels for representational-alignment guidance.

One sub-command per module in guidance_kernels.commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fused CKA / Procrustes kernels for representational-alignment guidance.")


@app.callback()
def _root() -> None:
    """Fused kernels for representational-alignment guidance."""

# name -> module in guidance_kernels.commands that defines `command` (a typer-annotated function)
COMMANDS = {
    "demo": "demo",
    "check": "check",
    "bench": "bench",
    "similarity": "similarity",
}

for _name, _module in COMMANDS.items():
    _mod = importlib.import_module(f"guidance_kernels.commands.{_module}")
    app.command(_name, help=_mod.command.__doc__)(_mod.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
