"""The memory's ledger over time (`--trace FILE`): what it held at every step, what
went when and why, and what each slot was receiving. JSON Lines, one event a line,
written whole and flushed as it happens, so an interrupted run leaves a valid file.

Every token that enters the memory gets an `id`: the order it was read in (0, 1,
...). The events, each with the `step` it belongs to (a step is one call that reads
or edits: a prompt, a generated token, a chat turn's text, an edit):

    {"type": "trace", "version": 1, "model", "capacity", "keep", "evict", "policy", "recent"}
    {"type": "start", "step": 0, "slots": [{"id", "token", "text", "origin", "pinned"}]}   a memory that held tokens already
    {"type": "read", "step", "at", "ids": [...], "tokens": [...], "text": [...], "origin", "pinned": [...]}
    {"type": "evict", "step", "why": "evict"|"unread"|"forget", "policy", "slots": [at, ...],
        "dropped": [{"id", "token", "text", "origin", "score", "position", "age"}], "recompute_from", "recomputed"}
    {"type": "pin", "step", "slots": [...], "pinned": true|false}
    {"type": "restore", "step", "slots": [...]}                          undo, or a memory put back whole
    {"type": "attention", "step", "received": [...]}                   the attention policy's credit, per slot
    {"type": "truncated", "step", "events"}                             the cap was reached; nothing follows

`rebuild(events, step)` replays them: the slots held after `step` (default: the last).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from wmgen.render import json_text

if TYPE_CHECKING:
    from wmgen.policies import Slot

VERSION = 1
MAX_TRACE_BYTES = 1 << 30  # a ledger of millions of steps; beyond it a mistake


class Trace:
    """A ledger being written for one memory (set as `memory.trace`). `cap` bounds
    the events written (None: no bound); past it one `truncated` event ends it."""

    def __init__(self, out: TextIO, memory, *, cap: int | None = None):
        self.out, self.cap, self.written = out, cap, 0
        self.step = 0
        self.next_id = 0
        self.ids: list[int] = []  # the id of each slot now, in slot order
        self.born: dict[int, int] = {}  # id -> the step it was read at
        self.token_text = memory.tokenizer.token_text if memory.tokenizer is not None else (lambda t: "")
        s = memory.shape
        self._write({"type": "trace", "version": VERSION, "model": memory.model_id, "capacity": s.capacity, "keep": s.keep,
                     "evict": s.evict, "policy": s.policy, "recent": s.recent})
        if memory.slots:
            self._write({"type": "start", "step": 0, "slots": self._new_slots(memory.slots)})

    # --- from the memory ---------------------------------------------------------------

    def begin(self) -> None:
        """A new step: a call that reads or edits."""
        self.step += 1

    def read(self, at: int, new: Sequence[Slot]) -> None:
        ids = list(range(self.next_id, self.next_id + len(new)))
        self.next_id += len(new)
        self.ids[at:at] = ids
        for i in ids:
            self.born[i] = self.step
        record = {"type": "read", "step": self.step, "at": at, "ids": ids, "tokens": [s.token for s in new],
                  "text": [self.token_text(s.token) for s in new], "origin": new[0].origin if new else None}
        if any(s.pinned for s in new):
            record["pinned"] = [s.pinned for s in new]
        self._write(record)

    def drop(self, indices: Sequence[int], slots: Sequence[Slot], why: str, policy: str, fill_after: int) -> None:
        """`slots` are the memory's slots before the drop."""
        dropped = []
        for i in indices:
            s, uid = slots[i], self.ids[i]
            dropped.append({"id": uid, "token": s.token, "text": self.token_text(s.token), "origin": s.origin,
                            "score": s.score if s.queries else None, "position": i, "age": self.step - self.born.get(uid, self.step),
                            "pinned": s.pinned})
        gone = set(indices)
        self.ids = [uid for i, uid in enumerate(self.ids) if i not in gone]
        first = min(indices) if indices else fill_after
        self._write({"type": "evict", "step": self.step, "why": why, "policy": policy, "slots": list(indices), "dropped": dropped,
                     "recompute_from": first, "recomputed": max(0, fill_after - first)})

    def pin(self, indices: Sequence[int], value: bool) -> None:
        if indices:
            self._write({"type": "pin", "step": self.step, "slots": list(indices), "pinned": value})

    def restore(self, slots: Sequence[Slot]) -> None:
        self._write({"type": "restore", "step": self.step, "slots": self._new_slots(slots)})

    def received(self, shares: Sequence[float]) -> None:
        """One number per slot each step: written as text at once (4 significant
        digits), not through the JSON encoder, which would cost a step ~2% at 1024 slots."""
        numbers = ",".join(f"{x:.4g}" if math.isfinite(x) else "null" for x in shares)
        self._write_line(f'{{"type": "attention", "step": {self.step}, "received": [{numbers}]}}')

    # --- writing ---------------------------------------------------------------------------

    def _new_slots(self, slots: Sequence[Slot]) -> list[dict]:
        out = []
        self.ids = []
        for s in slots:
            uid, self.next_id = self.next_id, self.next_id + 1
            self.ids.append(uid)
            self.born[uid] = self.step
            out.append({"id": uid, "token": s.token, "text": self.token_text(s.token), "origin": s.origin, "pinned": s.pinned})
        return out

    def _write(self, record: dict) -> None:
        self._write_line(None, record)

    def _write_line(self, line: str | None, record: dict | None = None) -> None:
        if self.cap is not None and self.written >= self.cap:
            return
        self.written += 1
        if self.cap is not None and self.written == self.cap:
            line, record = None, {"type": "truncated", "step": self.step, "events": self.cap}
        try:
            self.out.write((line if line is not None else json_text(record)) + "\n")
            self.out.flush()
        except (OSError, ValueError):  # a full disk or a closed file: the run goes on without its ledger
            self.cap, self.written = 0, 1

    def close(self) -> None:
        try:
            self.out.close()
        except OSError:
            pass

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading a ledger --------------------------------------------------------------------


class BadTrace(ValueError):
    """A file that is not a wmgen trace."""


def read_events(lines: Iterable[str], source: str = "the trace") -> list[dict]:
    """A ledger's events; a last line cut short (the run was killed mid-write) is left out."""
    from wmgen import files

    events: list[dict] = []
    pending: str | None = None
    for number, line in enumerate(lines, start=1):
        if pending is not None:
            raise BadTrace(f"{source} line {number - 1} is not JSON: {pending[:60]!r}")
        if not line.strip():
            continue
        try:
            record = files.parse_json(line)
        except files.FileProblem:
            pending = line  # only the last line may be cut short
            continue
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise BadTrace(f"{source} line {number} is not a trace event")
        events.append(record)
    if not events or events[0].get("type") != "trace":
        raise BadTrace(f"{source} is not a wmgen trace (it should begin with a 'trace' line; make one with --trace FILE)")
    if events[0].get("version") != VERSION:
        raise BadTrace(f"{source} is a trace of version {events[0].get('version')}; this wmgen reads {VERSION}")
    return events


def rebuild(events: Sequence[dict], step: int | None = None) -> list[dict]:
    """The slots the memory held after `step` (default: the last): one dict each,
    `id`, `token`, `text`, `origin`, `pinned`, in slot order."""
    slots: list[dict] = []
    for e in events:
        if step is not None and e.get("step", 0) > step:
            break
        kind = e["type"]
        if kind in ("start", "restore"):
            slots = [dict(s) for s in e["slots"]]
        elif kind == "read":
            pins = e.get("pinned") or [False] * len(e["ids"])
            new = [{"id": i, "token": t, "text": x, "origin": e["origin"], "pinned": p}
                   for i, t, x, p in zip(e["ids"], e["tokens"], e["text"], pins)]
            slots[e["at"] : e["at"]] = new
        elif kind == "evict":
            gone = set(e["slots"])
            slots = [s for i, s in enumerate(slots) if i not in gone]
        elif kind == "pin":
            for i in e["slots"]:
                slots[i]["pinned"] = e["pinned"]
    return slots


def timeline(events: Sequence[dict]) -> dict:
    """What a timeline picture draws: per token id (in read order) its text, origin
    and the steps it was held; evictions and recomputes by step; pins; and under
    the attention policy the attention each held slot received at each step."""
    slots: list[int] = []
    rows: dict[int, dict] = {}
    held: dict[int, list[int]] = {}
    received: dict[tuple[int, int], float] = {}
    evictions: list[tuple[int, int, int]] = []  # (step, evicted, recompute_from)
    dropped: dict[int, int] = {}  # id -> the step it was evicted or forgotten at
    recomputed: list[tuple[int, list[int]]] = []  # (step, the ids whose keys and values were computed again)
    last = 0
    pins: dict[int, bool] = {}

    def note(step: int) -> None:
        for uid in slots:
            steps = held.setdefault(uid, [])
            if not steps or steps[-1] != step:
                steps.append(step)

    current = 0
    for e in events:
        kind, step = e["type"], e.get("step", 0)
        if kind == "trace" or kind == "truncated":
            continue
        if step != current:  # what a step held is what it ended with
            note(current)
            current = step
        last = max(last, step)
        if kind in ("start", "restore"):
            slots = [s["id"] for s in e["slots"]]
            for s in e["slots"]:
                rows.setdefault(s["id"], {"text": s["text"], "origin": s["origin"], "pinned": s["pinned"]})
                pins[s["id"]] = s["pinned"]
        elif kind == "read":
            pinned = e.get("pinned") or [False] * len(e["ids"])
            for uid, text, p in zip(e["ids"], e["text"], pinned):
                rows[uid] = {"text": text, "origin": e["origin"], "pinned": p}
                pins[uid] = p
            slots[e["at"] : e["at"]] = e["ids"]
        elif kind == "evict":
            gone = set(e["slots"])  # they leave at this step: not held in it
            slots = [uid for i, uid in enumerate(slots) if i not in gone]
            if e.get("why") == "unread":  # a prompt too long for the memory: never held, no eviction
                continue
            recomputed.append((step, slots[e.get("recompute_from", len(slots)) :]))
            evictions.append((step, len(gone), e.get("recompute_from", 0)))
            for d in e.get("dropped", []):
                dropped[d["id"]] = step
            continue
        elif kind == "pin":
            for i in e["slots"]:
                pins[slots[i]] = e["pinned"]
                rows[slots[i]]["pinned"] = rows[slots[i]]["pinned"] or e["pinned"]
        elif kind == "attention":
            for uid, share in zip(slots, e["received"]):
                received[(uid, step)] = share
    note(current)
    rows = {uid: row for uid, row in rows.items() if uid in held}  # a prompt's unread tokens were never held
    return {"rows": rows, "held": held, "received": received, "evictions": evictions, "dropped": dropped, "recomputed": recomputed, "steps": last,
            "policy": events[0].get("policy"), "model": events[0].get("model"), "capacity": events[0].get("capacity")}


def load(path: str) -> list[dict]:
    """The events of a trace file, or a one-line UsageError."""
    from wmgen import files
    from wmgen.errors import UsageError

    try:
        text = files.utf8(files.read_regular(Path(path), MAX_TRACE_BYTES))
    except FileNotFoundError:
        raise UsageError(f"no trace {path}; make one with wmgen generate --trace {path}") from None
    except files.FileProblem as e:
        raise UsageError(f"trace {path} {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read trace {path}: {e.strerror}") from None
    try:
        return read_events(text.splitlines(), path)
    except BadTrace as e:
        raise UsageError(str(e)) from None

