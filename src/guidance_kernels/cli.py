"""guidance-kernels: fused CKA / Procrustes kernels for representational-alignment guidance.

One sub-command per module in guidance_kernels.commands. Every mistake (a bad option value, a
missing file, a device that is not there, an error raised by the package) ends in ONE place,
:class:`_Group.invoke`: one line ``error: ...`` on stderr and exit code 2, no traceback. Set
``GUIDANCE_KERNELS_DEBUG=1`` to get the traceback instead."""

from __future__ import annotations

import os

import typer
from typer.core import TyperGroup

from guidance_kernels.commands import bench, check, demo, similarity

DEBUG_ENV = "GUIDANCE_KERNELS_DEBUG"
EXIT_USAGE = 2  # any failure of a command: one line on stderr (the traceback only when debugging)

# errors that mean "the input is wrong" (bad value, file, device, model spec, out of memory)
_INPUT_ERRORS = (ValueError, TypeError, LookupError, OSError, ImportError, RuntimeError,
                 ZeroDivisionError, AssertionError)


def _one_line(e: BaseException) -> str:
    if hasattr(e, "format_message"):  # the CLI library's usage errors
        msg = e.format_message()
    elif isinstance(e, OSError) and e.strerror and e.filename and not str(e).startswith(str(e.filename)):
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e)
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])
    lines = [s.strip() for s in msg.strip().splitlines() if s.strip()]
    first = lines[0] if lines else type(e).__name__
    if isinstance(e, AssertionError) and "CUDA" in first:
        first = f"{first} (no usable CUDA device: use --device cpu)"
    return first


class _Group(TyperGroup):
    """The app's command group: turns every error below it into one line and exit code 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the one place errors become messages
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            where = f"{ctx.invoked_subcommand}: " if ctx.invoked_subcommand else ""
            if type(e).__name__ == "NoArgsIsHelpError":
                raise
            if isinstance(e, (typer.TyperException, *_INPUT_ERRORS)):
                typer.echo(f"error: {where}{_one_line(e)}", err=True)
            else:  # unexpected kinds (often from user code: a model factory, a data file) keep their name
                typer.echo(f"error: {where}{type(e).__name__}: {_one_line(e)} "
                           f"(set {DEBUG_ENV}=1 for the traceback)", err=True)
            raise typer.Exit(EXIT_USAGE) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Fused CKA / Procrustes kernels for representational-alignment guidance.")


@app.callback()
def _root() -> None:
    """Fused kernels for representational-alignment guidance."""


for _name, _mod in (("demo", demo), ("check", check), ("bench", bench), ("similarity", similarity)):
    app.command(_name, help=_mod.command.__doc__)(_mod.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
