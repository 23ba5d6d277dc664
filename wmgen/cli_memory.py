"""`wmgen memory ...`: edits to saved sessions, for pipelines. Each reads a session,
applies one rule of `wmgen.edits` to its slots, and saves it atomically, keeping the
version it replaced for `wmgen memory undo`. No model runs: the next `generate -c` (or
`chat -s`) recomputes the keys and values from the first changed slot. Spans are
`I-J`, inclusive, numbered as `inspect-memory` numbers slots."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from wmgen.errors import SessionError, UsageError

memory_app = typer.Typer(
    name="memory",
    help="Edit saved memories: forget, pin, unpin, insert, fork, undo, diff. Spans are I-J (inclusive) or I.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Session = Annotated[str, typer.Argument(help="The session to edit (see: wmgen sessions).", show_default=False)]
Span = Annotated[Optional[str], typer.Argument(help="Slots I-J (inclusive) or one slot I.", show_default=False)]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No notices on stderr.")]


def _say(message: str, quiet: bool) -> None:
    from wmgen.cli import notice

    notice(message, quiet)


def _edit(name: str, change, quiet: bool) -> None:
    """Read session `name`, let `change(slots, record, tokenizer)` edit its slots in
    place (returning the slots and what to say), and save it, undoably."""
    from wmgen import session as sessions
    from wmgen.model import load_tokenizer
    from wmgen.settings import state_dir
    from wmgen.snapshot import describe, shape_of, slots_of

    state = state_dir(os.environ)
    record = sessions.read(state, sessions.check_name(name))
    _, tokenizer = load_tokenizer(record["model"])
    if tokenizer.fingerprint != record["tokenizer"]:
        raise SessionError(f"session '{name}' was made with another tokenizer than {record['model']}'s; it was not changed")
    slots, said = change(slots_of(record), record, tokenizer)
    snap = describe(
        slots, shape_of(record), counters=record["counters"], kv_bytes_per_token=record["kv_bytes_per_token"],
        token_text=tokenizer.token_text, model=record["model"], tokenizer=record["tokenizer"],
        sampling=record.get("sampling"), text=tokenizer.decode([s.token for s in slots]),
    )
    sessions.write(state, name, snap, undoable=True)
    _say(f"session '{name}': {said}; undo with: wmgen memory undo {name}", quiet)


def _spans(span: str | None, text: str | None, slots, tokenizer) -> list[tuple[int, int]]:
    from wmgen import edits
    from wmgen.spans import parse_span

    if (span is None) == (text is None):
        raise UsageError("give a span I-J, or --text TEXT (not both)")
    if span is not None:
        return [parse_span(span, len(slots))]
    found = edits.find([tokenizer.token_bytes(s.token) for s in slots], text)
    if not found:
        raise UsageError(f"{text!r} is not in the memory; nothing was changed")
    return found


@memory_app.command("forget")
def forget(
    session: Session,
    span: Span = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Forget every occurrence of this text instead of a span.", show_default=False)] = None,
    pinned: Annotated[bool, typer.Option("--pinned", help="Forget pinned slots in the span too (they are refused otherwise).")] = False,
    quiet: Quiet = False,
) -> None:
    """Forget slots of a saved memory (a span, or every occurrence of --text)."""
    from wmgen import edits
    from wmgen.spans import show_span

    def change(slots, record, tokenizer):
        spans = _spans(span, text, slots, tokenizer)
        for start, stop in reversed(spans):  # from the end: earlier spans keep their numbers
            slots = edits.forget(slots, start, stop, pinned=pinned)
        gone = sum(stop - start for start, stop in spans)
        return slots, f"forgot {gone} slot(s) ({', '.join(show_span(*s) for s in spans)}); recomputed from slot {spans[0][0]} when next run"

    _edit(session, change, quiet)


def _pins(session: str, span: str | None, text: str | None, value: bool, quiet: bool) -> None:
    from dataclasses import replace

    from wmgen import edits
    from wmgen.spans import show_span

    def change(slots, record, tokenizer):
        spans = _spans(span, text, slots, tokenizer)
        changed = 0
        trial = [replace(s) for s in slots]  # all or nothing
        for start, stop in spans:
            changed += edits.set_pins(trial, start, stop, value, capacity=record["capacity"], evict=record["evict"])
        verb = "pinned" if value else "unpinned"
        total = sum(s.pinned for s in trial)
        return trial, f"{verb} {changed} slot(s) ({', '.join(show_span(*s) for s in spans)}); {total} pinned in all"

    _edit(session, change, quiet)


@memory_app.command("pin")
def pin(session: Session, span: Span = None,
        text: Annotated[Optional[str], typer.Option("--text", help="Pin every occurrence of this text instead of a span.", show_default=False)] = None,
        quiet: Quiet = False) -> None:
    """Pin slots of a saved memory, anywhere: no policy evicts them."""
    _pins(session, span, text, True, quiet)


@memory_app.command("unpin")
def unpin(session: Session, span: Span = None,
          text: Annotated[Optional[str], typer.Option("--text", help="Unpin every occurrence of this text instead of a span.", show_default=False)] = None,
          quiet: Quiet = False) -> None:
    """Unpin slots of a saved memory."""
    _pins(session, span, text, False, quiet)


@memory_app.command("insert")
def insert(
    session: Session,
    index: Annotated[int, typer.Argument(help="Insert before this slot (the memory's fill appends).", show_default=False)],
    text: Annotated[str, typer.Argument(help="The text to insert.", show_default=False)],
    quiet: Quiet = False,
) -> None:
    """Insert text into a saved memory before a slot (origin 'inserted')."""
    from wmgen import edits, policies
    from wmgen.settings import check_utf8
    from wmgen.snapshot import shape_of

    check_utf8(text, "TEXT")

    def change(slots, record, tokenizer):
        ids = tokenizer.encode(text)
        s = shape_of(record)
        policy = policies.make(s.policy, evict=s.evict, recent=s.recent, token_bytes=tokenizer.token_bytes)
        new = [policies.Slot(t, "inserted", new=True) for t in ids]
        slots, dropped = edits.insert(slots, index, new, capacity=record["capacity"], policy=policy)
        record["counters"] = record["counters"] | {"seen": record["counters"]["seen"] + len(ids)}
        if dropped:
            c = record["counters"]
            record["counters"] = c | {"evictions": c["evictions"] + 1, "evicted": c["evicted"] + len(dropped)}
        evicted = f"; evicted {len(dropped)} by the {s.policy} policy to make room" if dropped else ""
        return slots, f"inserted {len(ids)} token(s) before slot {index}{evicted}"

    _edit(session, change, quiet)


@memory_app.command("fork")
def fork(
    session: Session,
    new: Annotated[str, typer.Argument(help="The name of the copy (must not exist yet).", show_default=False)],
    quiet: Quiet = False,
) -> None:
    """Copy a saved memory to a new name, to try another continuation."""
    from wmgen import session as sessions
    from wmgen.settings import state_dir

    path = sessions.fork(state_dir(os.environ), sessions.check_name(session), sessions.check_name(new))
    _say(f"forked session '{session}' as '{new}' ({path})", quiet)


@memory_app.command("undo")
def undo(session: Session, quiet: Quiet = False) -> None:
    """Go back to the version before the last `wmgen memory` edit (again: redo)."""
    from wmgen import session as sessions
    from wmgen.settings import state_dir

    sessions.undo(state_dir(os.environ), sessions.check_name(session))
    _say(f"session '{session}' is back to the version before its last edit (undo again to redo)", quiet)


@memory_app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="One session.", show_default=False)],
    b: Annotated[str, typer.Argument(help="The other.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="The diff as JSON: the shared tokens and those only in one.")] = False,
    context: Annotated[int, typer.Option("--context", "-U", help="Shared tokens shown around each change.", min=0)] = 3,
) -> None:
    """Compare two saved memories token by token, as diff -u compares lines."""
    from wmgen import session as sessions
    from wmgen.render import diff_json, put_line, show_diff
    from wmgen.settings import state_dir

    state = state_dir(os.environ)
    first, second = (sessions.read(state, sessions.check_name(n)) for n in (a, b))
    if first["tokenizer"] != second["tokenizer"]:
        raise UsageError(f"sessions '{a}' and '{b}' were made with different tokenizers, so their tokens cannot be compared")
    result = sessions.diff(first, second)
    if as_json:
        put_line(sys.stdout, diff_json(result, a, b), indent=1)
    else:
        show_diff(result, a, b, sys.stdout, context=context)
