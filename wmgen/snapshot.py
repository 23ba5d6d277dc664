"""The layout of a memory as plain data: what `WorkingMemory.snapshot()` gives, what
session files hold, what `inspect-memory --json` prints. Written here (`describe`),
read here (`validate`, `slots_of`), and migrated here from older versions; no other
module knows which keys a slot record has.

Schema 2 records per slot whether it is `pinned` (pins may sit anywhere) and `new`
(read but not yet run through the model: its query still counts for the attention
policy). Schema 1 files, written before pins were a slot's own, are read as schema 2:
their `pinned` flags were the head `keep` pinned, and no slot was new.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import TypedDict

from wmgen.policies import POLICIES, Slot
from wmgen.window import Shape

SCHEMA_VERSION = 2
ORIGINS = ("prompt", "generated", "continued", "inserted")

# Every whole number in a snapshot stays below 2**53: it is exact as a double, which is
# what jq and JavaScript read JSON numbers as, and no count of tokens comes near it.
MAX_INT = 2**53 - 1


class SlotRecord(TypedDict, total=False):
    slot: int  # its place in `slots`, which is also its position
    position: int
    token: int
    origin: str  # one of ORIGINS
    logprob: float | None  # nats; null for a token that was read, not sampled
    pinned: bool
    new: bool
    text: str  # the token's own text (a view's convenience; not read back)
    score: float | None  # attention policy: mean attention received; null before any query
    queries: int  # attention policy: how many queries have attended to it


class Counters(TypedDict):
    evictions: int
    evicted: int
    recomputed: int
    seen: int


class Snapshot(TypedDict, total=False):
    schema_version: int  # written by the session files
    name: str
    saved_at: str
    created_at: str
    capacity: int
    keep: int
    evict: int
    policy: str
    recent: int  # attention policy only
    fill: int
    pinned: int  # how many slots are pinned (written for views; counted again when read)
    kv_bytes: int
    kv_bytes_per_token: int
    counters: Counters
    model: str
    tokenizer: str
    sampling: dict | None
    text: str
    slots: list[SlotRecord]


# --- writing ----------------------------------------------------------------------------


def describe(slots: Sequence[Slot], shape: Shape, *, counters: dict, kv_bytes_per_token: int,
             token_text: Callable[[int], str] | None = None, **about) -> Snapshot:
    """A memory as plain data: shape, policy, counters, and one record per slot,
    with the token's text when `token_text` is given, and its score under the
    attention policy (null until a later token has attended to it; `queries` says
    how many have). `about` (model id, tokenizer fingerprint, sampling settings,
    text) is included as given. Every number is finite, so the result is strict JSON."""
    scored = shape.policy == "attention"
    records: list[SlotRecord] = []
    for i, s in enumerate(slots):
        record: SlotRecord = {"slot": i, "position": i, "token": s.token, "origin": s.origin,
                              "logprob": _finite(s.logprob), "pinned": s.pinned, "new": s.new}
        if token_text is not None:
            record["text"] = token_text(s.token)
        if scored:
            record["score"] = _finite(s.score) if s.queries else None
            record["queries"] = s.queries
        records.append(record)
    snap: Snapshot = {"capacity": shape.capacity, "keep": shape.keep, "evict": shape.evict, "policy": shape.policy}
    if scored:
        snap["recent"] = shape.recent if shape.recent is not None else 0
    snap |= {
        "fill": len(records),
        "pinned": sum(s.pinned for s in slots),
        "kv_bytes": kv_bytes_per_token * len(records),
        "kv_bytes_per_token": kv_bytes_per_token,
        "counters": Counters(**counters),  # type: ignore[typeddict-item]
    }
    return snap | about | {"slots": records}  # type: ignore[return-value]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --- reading ----------------------------------------------------------------------------


def slots_of(record: Snapshot | dict) -> list[Slot]:
    """The slots a (validated) snapshot holds, with their pins and scores."""
    out = []
    for s in record["slots"]:
        queries = s.get("queries") or 0
        score = s.get("score")
        attention, counted = (score * queries, queries) if score is not None and queries else (0.0, 0)
        logprob = s.get("logprob")
        out.append(Slot(s["token"], s["origin"], logprob if logprob is None or math.isfinite(logprob) else None,
                        attention, counted, bool(s.get("pinned")), bool(s.get("new"))))
    return out


def shape_of(record: Snapshot | dict) -> Shape:
    policy = record.get("policy", "oldest")
    return Shape(record["capacity"], record["keep"], record["evict"], policy, record.get("recent") if policy == "attention" else None)


# --- validation -------------------------------------------------------------------------
#
# A check returns what is wrong with a value ("must be ..."), or None. Required keys
# are the ones every wmgen writes and that continuing or showing a memory needs;
# optional ones may be absent (sessions from before policies have no `policy`,
# `recent`, `score` or `queries`) but are checked when present. Other keys are let
# through unchecked (a later wmgen may add some); `counters` takes exactly its four,
# since the memory is rebuilt from them. What passes can be used by every command:
# the numbers are in range for the arithmetic done on them, the shape is one a
# memory can take. What needs the model (token ids in its vocabulary, a capacity it
# can hold) is checked where the model is at hand (`wmgen.api.Model.restore`).


class Unusable(Exception):
    """What is wrong with a snapshot, in words that name the field."""


class OtherVersion(Exception):
    """A snapshot of a schema version this wmgen does not read (a newer one)."""


Check = Callable[[object], "str | None"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int) -> Check:
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_INT else f"must be an integer in {low}..2**53-1"


def string(v) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def mapping(v) -> str | None:
    return None if isinstance(v, dict) else "must be an object"


def mapping_or_null(v) -> str | None:
    return None if v is None or isinstance(v, dict) else "must be an object or null"


def array(v) -> str | None:
    return None if isinstance(v, list) else "must be a list"


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def logprob(v) -> str | None:
    # nats: float32 logits put any token above -1e4 (room for float rounding above 0)
    ok = v is None or (_is_number(v) and (v == -math.inf or -1e4 <= v <= 1e-6))
    return None if ok else "must be a number in [-1e4, 0], -Infinity or null"


def score(v) -> str | None:
    # a mean of attention shares: in [0, 1] (with room for float rounding); Infinity,
    # which earlier versions could write for a slot no query had reached, reads as null
    ok = v is None or v == math.inf or (_is_number(v) and 0 <= v <= 1 + 1e-6)
    return None if ok else "must be a number in [0, 1] or null"


def origin(v) -> str | None:
    return None if isinstance(v, str) and v in ORIGINS else f"must be one of {', '.join(ORIGINS)}"


def policy(v) -> str | None:
    return None if isinstance(v, str) and v in POLICIES else f"must be one of {', '.join(POLICIES)}"


#                  key: (required, check)
FIELDS: dict[str, tuple[bool, Check]] = {
    "name": (False, string),
    "saved_at": (False, string),
    "created_at": (False, string),
    "capacity": (True, integer(2)),
    "keep": (True, integer(0)),  # < capacity
    "evict": (True, integer(1)),  # <= capacity - keep
    "fill": (True, integer(0)),  # == len(slots) <= capacity
    "kv_bytes": (True, integer(0)),
    "kv_bytes_per_token": (True, integer(0)),
    "counters": (True, mapping),  # exactly COUNTERS
    "model": (True, string),
    "tokenizer": (True, string),
    "sampling": (False, mapping_or_null),  # null: the memory has not generated yet
    "text": (False, string),
    "policy": (False, policy),
    "recent": (False, integer(0)),
    "slots": (True, array),  # of SLOT_FIELDS
}
COUNTERS: dict[str, tuple[bool, Check]] = {k: (True, integer(0)) for k in ("evictions", "evicted", "recomputed", "seen")}
SLOT_FIELDS: dict[str, tuple[bool, Check]] = {
    "slot": (True, integer(0)),  # == its index in slots
    "position": (True, integer(0)),  # < capacity
    "token": (True, integer(0)),
    "origin": (True, origin),
    "logprob": (True, logprob),
    "pinned": (True, boolean),
    "new": (False, boolean),
    "text": (False, string),
    "score": (False, score),  # null: no later token has attended to it yet
    "queries": (False, integer(0)),
}


def validate(record) -> Snapshot:
    """`record` as a schema-2 snapshot (one of schema 1 is migrated, in place) if
    every command can use it; else Unusable (or OtherVersion)."""
    if not isinstance(record, dict):
        raise Unusable(f"it holds {show(record)}, not a JSON object")
    if "schema_version" in record:
        version = record["schema_version"]
        if not _is_int(version) or version < 1:
            raise Unusable(_wrong("schema_version", version, "must be an integer >= 1"))
        if version > SCHEMA_VERSION:
            raise OtherVersion(version)
    _check_fields(record, FIELDS, "")
    _check_fields(record["counters"], COUNTERS, "counters.", exact=True)
    capacity, keep, evict, fill, slots = (record[k] for k in ("capacity", "keep", "evict", "fill", "slots"))
    if keep >= capacity:
        raise Unusable(f"'keep' is {show(keep)}, must be below 'capacity' ({show(capacity)})")
    if evict > capacity - keep:
        raise Unusable(f"'evict' is {show(evict)}, must be at most 'capacity' - 'keep' = {show(capacity - keep)}")
    if record.get("policy") == "attention" and "recent" in record and record["recent"] > capacity - keep - evict:
        raise Unusable(f"'recent' is {show(record['recent'])}, must be at most 'capacity' - 'keep' - 'evict' = {capacity - keep - evict}")
    if fill != len(slots):
        raise Unusable(f"'fill' is {show(fill)}, but 'slots' holds {len(slots)}")
    if fill > capacity:
        raise Unusable(f"'fill' is {show(fill)}, above 'capacity' ({show(capacity)})")
    for i, slot in enumerate(slots):
        where = f"slots[{i}]"
        if not isinstance(slot, dict):
            raise Unusable(_wrong(where, slot, "must be an object"))
        _check_fields(slot, SLOT_FIELDS, where + ".")
        if slot["slot"] != i:
            raise Unusable(f"'{where}.slot' is {show(slot['slot'])}, must be {i} (its place in 'slots')")
        if slot.get("score") == math.inf:
            slot["score"] = None
        if slot["position"] >= capacity:
            raise Unusable(f"'{where}.position' is {show(slot['position'])}, must be below 'capacity' ({show(capacity)})")
    pinned = sum(1 for s in slots if s["pinned"])
    if pinned > capacity - evict:
        raise Unusable(f"{pinned} slots are pinned, leaving less than 'evict' ({evict}) of 'capacity' ({capacity}) to roll")
    record["schema_version"] = SCHEMA_VERSION  # schema 1 reads as 2: the same keys, `new` absent
    record["pinned"] = pinned
    return record  # type: ignore[return-value]


def _check_fields(record: dict, fields: dict[str, tuple[bool, Check]], prefix: str, exact: bool = False) -> None:
    for key, (required, check) in fields.items():
        if key not in record:
            if required:
                raise Unusable(f"'{prefix}{key}' is missing")
        elif problem := check(record[key]):
            raise Unusable(_wrong(prefix + key, record[key], problem))
    if exact and (unknown := sorted(set(record) - set(fields))):
        raise Unusable(f"'{prefix.rstrip('.')}' has an unknown key {show(unknown[0])}")


def _wrong(field: str, value, problem: str) -> str:
    return f"'{field}' is {show(value)}, {problem}"


def show(value) -> str:
    """A value as a short line of JSON-like text: huge numbers and long strings
    shortened, no line breaks of any kind."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if _is_int(value) and abs(value) >= 10**15:
        return f"a number of {len(str(abs(value)))} digits" if abs(value) < 10**4000 else "a number of more than 4000 digits"
    text = json.dumps(value, ensure_ascii=True)  # ASCII: no line breaks of any kind
    return text if len(text) <= 40 else text[:37] + "..."
