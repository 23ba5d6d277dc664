"""Reading what users and checkpoints put on disk: regular files only (a FIFO where a
file should be never hangs a read), never more than a stated limit, UTF-8 checked.
Problems come back as `FileProblem`, a phrase each caller puts in its own error
("{path} is a named pipe (FIFO), not a regular file")."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class FileProblem(Exception):
    """What is wrong with a file, as a predicate: "is a folder, not a regular file"."""


def kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def check_regular(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"is {kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise FileProblem(too_big(st.st_size, limit))


def too_big(size: int, limit: int) -> str:
    return f"is larger than {limit / 2**20:g} MiB ({size} bytes), more than wmgen reads from such a file"


def open_regular(path: str | Path, limit: int | None = None):
    """Regular file `path` opened for binary reading (refused when over `limit`
    bytes). FileNotFoundError when there is nothing there; FileProblem for a FIFO,
    a device, a folder, a file over the limit, or one that cannot be opened. The
    open never blocks (O_NONBLOCK: a FIFO swapped in after the stat is caught by
    the fstat)."""
    limit = limit if limit is not None else float("inf")
    try:
        check_regular(os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise FileProblem("is a symbolic link to a missing file") from None
        raise FileNotFoundError(path) from None
    except OSError as e:
        raise FileProblem(f"cannot be opened ({e.strerror})") from None
    try:
        check_regular(os.fstat(fd), limit)
    except FileProblem:
        os.close(fd)
        raise
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of regular file `path`, at most `limit`; see `open_regular`."""
    with open_regular(path, limit) as f:
        return read_stream(f, limit)


def read_stream(stream, limit: int) -> bytes:
    """At most `limit` bytes of a binary stream (a pipe, a device, stdin); more is a
    FileProblem, not a read until memory runs out."""
    try:
        data = stream.read(limit + 1)
    except OSError as e:
        raise FileProblem(f"cannot be read ({e.strerror})") from None
    if len(data) > limit:
        raise FileProblem(f"is larger than {limit / 2**20:g} MiB, more than wmgen reads from it")
    return data


def utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileProblem(f"is not UTF-8 text (bad byte at offset {e.start})") from None


def one_line(text, limit: int = 200) -> str:
    """`text` (a library's message) as one line of at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
