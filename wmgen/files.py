"""Reading what users and checkpoints put on disk: regular files only (a FIFO where a
file should be never hangs a read), never more than a stated limit, UTF-8 checked,
JSON and TOML parsed within bounds of depth and number size. Problems come back as
`FileProblem`, a phrase each caller puts in its own error ("{path} is a named pipe
(FIFO), not a regular file")."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tomllib
from pathlib import Path

# Nesting of `[`, `{` (and TOML's dotted keys) in a file wmgen parses. Its own files
# nest 4 deep; beyond this, a file is a mistake or an attack, not a setting.
MAX_DEPTH = 64
MAX_DIGITS = 4300  # of an integer: Python's own limit for turning text into an int


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


# --- parsing: every JSON and TOML file wmgen reads goes through these ----------------


def parse_json(text: str):
    """The value JSON `text` holds. Strict JSON only: NaN, Infinity and numbers that
    overflow to them are refused, and so are integers of more than `MAX_DIGITS`
    digits and nesting deeper than `MAX_DEPTH`. Every problem, whatever the
    structure, is a FileProblem ("is not valid JSON (...)"), never a RecursionError."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise FileProblem(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # one of ours, or a number Python cannot read
        raise FileProblem(f"is not valid JSON ({_number(e)})") from None
    except RecursionError:
        raise FileProblem(TOO_DEEP) from None
    return _within_depth(value)


def parse_toml(text: str) -> dict:
    """The table TOML `text` holds, within the same bounds as `parse_json` (NaN and
    infinities are TOML floats: the caller checks the values it uses). Dotted keys
    count as nesting, and are checked before parsing: `tomllib` spends time and
    memory on the square of a key's parts."""
    _check_dotted_keys(text)
    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FileProblem(f"is not valid TOML: {one_line(e)}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise FileProblem(f"is not valid TOML: {_number(e)}") from None
    except RecursionError:
        raise FileProblem(TOO_DEEP) from None
    return _within_depth(value)


TOO_DEEP = f"is nested more than {MAX_DEPTH} levels deep, more than wmgen reads"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text[:20]}{'...' if len(text) > 20 else ''} is beyond the range of a number")
    return x


def _integer(text: str) -> int:
    if len(text) > MAX_DIGITS + 1:
        raise ValueError(f"an integer of more than {MAX_DIGITS} digits")
    return int(text)


def _number(e: ValueError) -> str:
    """A ValueError from parsing a number, in words (not Python's advice to call
    `sys.set_int_max_str_digits`)."""
    return f"an integer of more than {MAX_DIGITS} digits" if "4300 digits" in str(e) else one_line(e, 80)


def _within_depth(value):
    """`value` if its lists and tables nest at most `MAX_DEPTH` deep; walked without
    recursion, so that a deep value cannot fail the check that refuses it."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise FileProblem(TOO_DEEP)
        stack.extend((child, depth + 1) for child in children)
    return value


# TOML's strings and comments, where a dot is text, not a key's separator (a
# multi-line string may end with up to two quotes of its own).
_TOML_TEXT = re.compile(
    r'"""(?:[^"\\]|\\[\s\S]|"(?!""))*"{0,2}"""'
    r"|'''[\s\S]*?'{3,5}"
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|'[^'\n]*'"
    r"|#[^\n]*"
)


def _check_dotted_keys(text: str) -> None:
    """Refuse a dotted key of more than `MAX_DEPTH` parts, and dotted keys whose parts
    squared add up to more than `MAX_DEPTH` keys of that many (the parsing costs
    that). A key never spans lines, so a line's dots outside strings and comments
    bound the parts of the keys on it."""
    if text.count(".") <= MAX_DEPTH:
        return
    dots = [line.count(".") for line in _TOML_TEXT.sub('""', text).split("\n")]
    if max(dots) > MAX_DEPTH:
        raise FileProblem(TOO_DEEP)
    if sum(n * n for n in dots) > MAX_DEPTH**3:
        raise FileProblem(f"has more deeply dotted keys than wmgen reads (as many as {MAX_DEPTH} keys of {MAX_DEPTH} parts)")
