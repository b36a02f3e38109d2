"""keraslm.files' bounded reads: only regular files, never more than the limit, never a wait.

Loading a bundle through them is tested in test_serve_bundle.py; these are the helpers alone.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from keraslm.errors import UserError
from keraslm.files import not_regular, open_binary, read_bounded, read_json


def _within(seconds: float, fifo: Path, call):
    """`call()`'s result (or exception), failing the test if it is still running after `seconds`;
    then `fifo` gets a writer that leaves at once, so that a call waiting on it returns."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=seconds)
    except FutureTimeout:
        os.close(os.open(fifo, os.O_RDWR))
        pytest.fail(f"still waiting on the FIFO after {seconds} s")
    finally:
        pool.shutdown(wait=False)


def test_a_file_of_exactly_the_limit_is_read_and_one_byte_more_is_not(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, 100) == b"x" * 100
    with pytest.raises(UserError) as err:
        read_bounded(path, 99)
    assert str(err.value) == f"{path}: over 99 bytes, more than it may have"
    path.write_bytes(b"")
    assert read_bounded(path, 0) == b""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_file_that_says_it_is_empty_is_still_read_only_to_the_limit():
    """/proc's files are regular files of size 0 that hold text: the size is not trusted."""
    assert os.stat("/proc/self/status").st_size == 0
    assert read_bounded("/proc/self/status", 1 << 20).startswith(b"Name:")
    with pytest.raises(UserError, match=r"^/proc/self/status: over 10 bytes"):
        read_bounded("/proc/self/status", 10)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError) as err:
        _within(10, fifo, lambda: read_bounded(fifo, 1000, name="vocab.json"))
    assert str(err.value) == "vocab.json: is not a regular file (a FIFO)"


def test_a_fifo_put_in_place_of_the_checked_file_is_refused_on_the_open_file(
        tmp_path, monkeypatch):
    """The path is a regular file when its type is checked and a FIFO when it is opened: the
    open returns at once (O_NONBLOCK) and the open file's own type is refused."""
    fifo, regular = tmp_path / "fifo", tmp_path / "regular"
    os.mkfifo(fifo)
    regular.write_bytes(b"{}")
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stat(
        regular if path == fifo else path, *a, **k))
    with pytest.raises(UserError) as err:
        _within(10, fifo, lambda: open_binary(fifo, regular=True))
    assert str(err.value) == f"{fifo}: is not a regular file (a FIFO)"


def test_devices_sockets_and_folders_are_refused_by_kind(tmp_path):
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        for path, kind in ((zero, "a character device"), (tmp_path / "sock", "a socket"),
                           (tmp_path, "a directory")):
            with pytest.raises(UserError) as err:
                read_bounded(path, 1 << 30)
            assert str(err.value) == f"{path}: is not a regular file ({kind})"
    finally:
        server.close()
    assert not_regular(os.stat(tmp_path / "sock").st_mode) == "a socket"


def test_a_plain_open_still_reads_a_fifo(tmp_path):
    """score.py reads a FIFO corpus: only `regular=True` refuses one."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"the text\n"), daemon=True)
    writer.start()
    with open_binary(fifo) as f:
        assert f.read() == b"the text\n"
    writer.join(10)


@pytest.mark.parametrize("data, reason", [
    (b"{not json", "Expecting property name"),
    (b"\xff{}", "invalid start byte"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_read_json_says_why_a_file_is_not_json_in_one_line(tmp_path, data, reason):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    with pytest.raises(UserError) as err:
        read_json(path)
    assert str(err.value).startswith(f"{path}: not valid JSON (")
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_read_json_is_bounded(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(path) == {"a": [1, 2]}
    with pytest.raises(UserError, match="over 12 bytes"):
        read_json(path, limit=12)
