"""Files written atomically and loaded without executing code.

Every file the package writes (checkpoints, JSON results, figures) goes through :func:`atomic_write`:
the bytes go to a temporary file in the destination's folder, are ``fsync``-ed, then renamed over
the destination, so a crash or a full disk leaves either the old file or the new one, never a
partial one, and never a stray temporary. Checkpoints load with ``torch.load(weights_only=True)``:
a crafted file cannot run code. Errors name the file and the cause (:class:`FileWriteError`,
:class:`FileLoadError`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["FileWriteError", "FileLoadError", "atomic_write", "write_json", "write_text",
           "save_figure", "save_torch", "load_torch", "strict_json"]


class FileWriteError(OSError):
    """A file could not be written; the message names the file and the cause."""


class FileLoadError(ValueError):
    """A file could not be read or is not a valid file of the expected kind; names the file."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The caller writes the temporary path (any writer that takes a path). On any error the temporary
    file is removed and a :class:`FileWriteError` naming ``path`` is raised (from the cause).
    ``suffix`` keeps writers that pick a format from the extension (matplotlib) working.
    """
    path = Path(path)
    if path.is_dir():
        raise FileWriteError(f"{path}: is a folder, expected a file path")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=folder)
        os.close(fd)
    except OSError as e:
        raise FileWriteError(f"{path}: cannot create a file in {folder}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, (KeyboardInterrupt, SystemExit, FileWriteError)):
            raise
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise FileWriteError(f"{path}: could not write: {cause}") from e


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return strict_json(obj.item())  # numpy / torch scalars
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return strict_json(obj.tolist())
    return obj


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """Write ``obj`` as strict JSON (non-finite floats become ``null``) atomically."""
    text = json.dumps(strict_json(obj), indent=indent, allow_nan=False, default=str)
    return write_text(path, text + "\n")


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format follows ``path``'s extension)."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", None) or (path.suffix[1:] or None)
    with atomic_write(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (fsync before the rename)."""
    import torch

    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch(path: str | os.PathLike, map_location: Any = None,
               check: Callable[[Any], None] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the cause.

    ``check`` (optional) validates the loaded object and raises ``ValueError`` on a wrong layout;
    its message is prefixed with the file name.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise FileLoadError(f"{path}: no such file")
    if path.is_dir():
        raise FileLoadError(f"{path}: is a folder, expected a file")
    size = path.stat().st_size
    if size == 0:
        raise FileLoadError(f"{path}: empty file (0 bytes): an interrupted write? delete it and retry")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileLoadError(f"{path}: not a trusted checkpoint (loaded with weights_only=True, "
                            f"which refuses code and unknown objects): {first}") from e
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileLoadError(f"{path}: corrupt or truncated ({size} bytes): {first}") from e
    if check is not None:
        try:
            check(obj)
        except (ValueError, KeyError, TypeError) as e:
            raise FileLoadError(f"{path}: {e}") from e
    return obj
