"""Files: written so that readers see them whole or not at all (a temporary name, then a
rename), and opened for reading with a user's mistake (missing, a folder, unreadable) as one line.

A file the program reads whole (a config, a vocabulary, bundle.json) is read by `read_bounded`:
only a regular file, never more than its limit, whatever it says its size is, so that a FIFO or
a link to /dev/zero is one line of error instead of a hang or a full memory."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from keraslm.errors import UserError

MAX_JSON_BYTES = 16 << 20  # read_json's default limit: a run's config.json is a few kB
_READ_CHUNK = 1 << 20


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


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """Read the JSON in a regular file of at most `limit` bytes (see `read_bounded`); a missing,
    special, oversized or corrupt file is a one-line UserError naming it."""
    data = read_bounded(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as err:  # bad JSON, bad UTF-8, or an integer too long to convert
        raise UserError(f"{path}: not valid JSON ({err})") from None


def read_bounded(path: str | os.PathLike, limit: int, name: str | None = None) -> bytes:
    """The bytes of the regular file `path`; a one-line UserError naming it (as `name`) when it
    is anything else (see `open_binary`) or holds more than `limit` bytes.

    Its size is not trusted: at most `limit + 1` bytes are read, so a file that grows while it is
    read, or says it is empty (as /proc's do), is refused at the limit all the same."""
    name = str(path) if name is None else name
    with open_binary(path, name, regular=True) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            data = b"" if size > limit else _read_at_most(f, limit + 1, first=size + 1)
        except OSError as err:
            raise UserError(f"cannot read {name}: {err.strerror or err}") from None
    if size > limit or len(data) > limit:
        raise UserError(f"{name}: over {limit:,} bytes, more than it may have")
    return data


def _read_at_most(f: IO[bytes], count: int, first: int) -> bytes:
    """Up to `count` bytes of `f`, asked for `first` bytes at a time, then a chunk at a time."""
    chunks, left, want = [], count, first
    while left > 0 and (chunk := f.read(min(want, left))):
        chunks.append(chunk)
        left -= len(chunk)
        want = _READ_CHUNK
    return b"".join(chunks)  # the one chunk itself, not a copy, when the size was right


def open_binary(path: str | os.PathLike, name: str | None = None, *,
                regular: bool = False) -> IO[bytes]:
    """Open a user's file for reading bytes; a missing, folder or unreadable file is a one-line
    UserError naming it (as `name`, when given: e.g. "<stdin>" for a temporary copy).

    With `regular`, anything but a regular file (a FIFO, a device, a socket, a folder) is refused
    too, without waiting on it: opening a FIFO would block until something writes to it."""
    name = str(path) if name is None else name
    try:
        return _open_regular(path, name) if regular else open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"file not found: {name}") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, not a text file") from None
    except OSError as err:
        raise UserError(f"cannot read {name}: {err.strerror or err}") from None


def _open_regular(path: str | os.PathLike, name: str) -> IO[bytes]:
    # The type is checked before opening, so a FIFO is never opened, and again on the open file,
    # in case the path was replaced in between: O_NONBLOCK makes that open return at once too
    # (and changes nothing for a regular file).
    _require_regular(os.stat(path).st_mode, name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        _require_regular(os.fstat(fd).st_mode, name)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, name: str) -> None:
    kind = not_regular(mode)
    if kind:
        raise UserError(f"{name}: is not a regular file ({kind})")


def not_regular(mode: int) -> str | None:
    """What a file of this `st_mode` is ("a FIFO", "a character device", ...) when it is not a
    regular file; None when it is one."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((kind for is_kind, kind in kinds if is_kind(mode)), "a special file")
