"""Edits to a memory's slots, as pure functions on lists (no torch): forget a span,
pin or unpin one, insert tokens. `WorkingMemory` applies them to a live memory (and
recomputes from the first changed slot); `wmgen memory ...` applies them to saved
sessions. One rule, one place: spans are `range`-like `(start, stop)`; a pinned slot
is forgotten only when asked for explicitly; pins always leave `evict` to roll."""

from __future__ import annotations

from collections.abc import Sequence

from wmgen.errors import UsageError
from wmgen.policies import Policy, Slot
from wmgen.window import check_pins


def check_span(start, stop, fill: int) -> tuple[int, int]:
    """`(start, stop)` if it is a non-empty span of a memory of `fill` slots."""
    if not (_is_index(start) and _is_index(stop)):
        raise UsageError(f"a span is two slot numbers, not {start!r} and {stop!r}", key="span")
    if not fill:
        raise UsageError("the memory is empty: there are no slots to edit", key="span")
    if not 0 <= start < stop <= fill:
        why = "is empty" if start == stop else "is reversed" if start > stop else "is out of range"
        raise UsageError(f"span {start}..{stop - 1} {why}: the memory has slots 0..{fill - 1}", key="span")
    return start, stop


def forget(slots: Sequence[Slot], start: int, stop: int, *, pinned: bool = False) -> list[Slot]:
    """`slots` without `start..stop-1`; a span holding a pinned slot only with `pinned`."""
    start, stop = check_span(start, stop, len(slots))
    held = [i for i in range(start, stop) if slots[i].pinned]
    if held and not pinned:
        raise UsageError(f"slots {start}..{stop - 1} hold {len(held)} pinned slot(s) (the first is {held[0]}); "
                         "unpin them first, or forget pinned slots explicitly", key="pinned")
    return [*slots[:start], *slots[stop:]]


def set_pins(slots: Sequence[Slot], start: int, stop: int, value: bool, *, capacity: int, evict: int) -> int:
    """Pin (or unpin) `start..stop-1` in place; how many changed. Pins that would
    leave fewer than `evict` slots to roll are refused, and nothing changes."""
    start, stop = check_span(start, stop, len(slots))
    changed = [s for s in slots[start:stop] if s.pinned != value]
    if value:
        check_pins(sum(s.pinned for s in slots) + len(changed), capacity, evict)
    for s in changed:
        s.pinned = value
    return len(changed)


def insert(slots: Sequence[Slot], index: int, new: Sequence[Slot], *, capacity: int, policy: Policy) -> tuple[list[Slot], list[int]]:
    """`new` placed before slot `index` (0..len; len appends), after dropping what
    `policy` picks to make room in `capacity`; the slots and the indices dropped."""
    if not new:
        raise UsageError("nothing to insert: the text has no tokens")
    if not _is_index(index) or not 0 <= index <= len(slots):
        raise UsageError(f"insert before slot {index!r}: the memory has slots 0..{len(slots) - 1}, "
                         f"so give 0..{len(slots)} ({len(slots)} appends)", key="index")
    need = len(slots) + len(new) - capacity
    drop: list[int] = []
    if need > 0:
        drop = policy.drop(slots, need)
        if len(drop) < need:
            pins = sum(s.pinned for s in slots)
            raise UsageError(f"{len(new)} tokens do not fit beside the {pins} pinned slots of capacity {capacity}; "
                             f"insert at most {capacity - pins}, or unpin some")
    gone = set(drop)
    index -= sum(1 for i in drop if i < index)
    kept = [s for i, s in enumerate(slots) if i not in gone]
    return [*kept[:index], *new, *kept[index:]], drop


def find(pieces: Sequence[bytes], text: str) -> list[tuple[int, int]]:
    """Where `text` occurs in the slots whose tokens' bytes are `pieces`: the
    `(start, stop)` spans that hold each occurrence, in order, not overlapping."""
    import bisect
    from itertools import accumulate

    if not isinstance(text, str) or not text:
        raise UsageError("give some text to find", key="text")
    ends = list(accumulate(len(p) for p in pieces))
    whole, needle = b"".join(pieces), text.encode("utf-8", "surrogateescape")
    spans, at = [], whole.find(needle)
    while at >= 0:
        first, last = bisect.bisect_right(ends, at), bisect.bisect_left(ends, at + len(needle))
        spans.append((first, last + 1))
        at = whole.find(needle, ends[last])
    return spans


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
