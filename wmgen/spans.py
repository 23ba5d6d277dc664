"""Spans of slots as people write them: `I-J` is slots I to J inclusive, as
`inspect-memory` numbers them, and `I` is one slot. The memory's own edits take
half-open `[start, stop)` spans, like `range`; the conversion is here, once, for
every command that takes a span (`chat`'s `/forget`, `/pin`, ...). Pure: no torch."""

from __future__ import annotations

import re

from wmgen.errors import UsageError

SPAN = re.compile(r"(\d+)(?:-(\d+))?")


def parse_span(text: str, fill: int) -> tuple[int, int]:
    """`"I-J"` (inclusive) or `"I"` as the half-open `(I, J + 1)`, checked against a
    memory of `fill` slots; UsageError for anything else."""
    m = SPAN.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"{text!r} is not a span: give a slot I or slots I-J (inclusive, numbered as inspect-memory numbers them)")
    first = int(m.group(1))
    last = first if m.group(2) is None else int(m.group(2))
    if last < first:
        raise UsageError(f"span {text} is reversed; write the lower slot first ({last}-{first})")
    if fill == 0:
        raise UsageError(f"span {text}: the memory is empty")
    if last >= fill:
        raise UsageError(f"span {text} is out of range: the memory holds slots 0-{fill - 1}")
    return first, last + 1


def show_span(start: int, stop: int) -> str:
    """A half-open span as people write it: `"4-9"`, or `"4"` for one slot."""
    return f"{start}" if stop - start == 1 else f"{start}-{stop - 1}"
