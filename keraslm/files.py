"""Files: written so that readers see them whole or not at all (a temporary name, then a
rename), and opened for reading with a user's mistake (missing, a folder, unreadable) as one line."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from keraslm.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the final suffix (Keras insists on `.weights.h5`). A symbolic
    link is written through: its target is replaced and the link stays.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's file-mode creation mask (reading it means setting it: set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, turning a missing or corrupt file into a one-line UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def open_binary(path: str | os.PathLike, name: str | None = None) -> IO[bytes]:
    """Open a user's file for reading bytes; a missing, folder or unreadable file is a one-line
    UserError naming it (as `name`, when given: e.g. "<stdin>" for a temporary copy)."""
    name = str(path) if name is None else name
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"file not found: {name}") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, not a text file") from None
    except OSError as err:
        raise UserError(f"cannot read {name}: {err.strerror or err}") from None
