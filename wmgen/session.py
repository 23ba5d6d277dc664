"""Saved working memories ("sessions"): versioned JSON files in the per-user state
folder, written atomically under a lock, validated whole when read, and never
silently replaced: not when unreadable, not when made with another tokenizer."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from wmgen import files
from wmgen.errors import SessionError, UsageError

SCHEMA_VERSION = 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# A full 1024-token session is about 0.2 MB. The limit leaves room for any window a
# GPT-2 checkpoint may have, while a stray huge file costs one stat, not a read.
MAX_BYTES = 64 * 1024 * 1024

# How many alternatives `free_name` tries (`name-2` .. `name-100`) before asking the
# user to clean up.
MAX_ALTERNATIVES = 100


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise UsageError(f"session name: expected a str, not {type(name).__name__}")
    if not _allowed(name):
        raise UsageError(
            f"session name {name!r} is not allowed; use letters, digits, '.', '_' and '-' (no slashes, no '..', at most 64)"
        )
    return name


def _allowed(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and ".." not in name


def folder(state: Path) -> Path:
    from wmgen.settings import folder_path

    return folder_path(state, "state") / "sessions"


def path_of(state: Path, name: str) -> Path:
    return folder(state) / f"{check_name(name)}.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the schema -------------------------------------------------------------------------
#
# The layout `window.describe` makes, plus what `write` adds. A check returns what is
# wrong with a value ("must be ..."), or None. Required keys are the ones every wmgen
# writes and that continuing or showing a memory needs; optional ones may be absent
# (sessions from before policies have no `policy`, `recent`, `score` or `queries`)
# but are checked when present. Other keys are
# let through unchecked (a later wmgen may add some); `counters` takes exactly its
# four, since the memory is rebuilt from them as keyword arguments.

Check = Callable[[object], "str | None"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int) -> Check:
    return lambda v: None if _is_int(v) and v >= low else f"must be an integer >= {low}"


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
    ok = v is None or (_is_number(v) and (math.isfinite(v) or v == -math.inf))
    return None if ok else "must be a finite number, -Infinity or null"


def score(v) -> str | None:
    return None if v is None or (_is_number(v) and not math.isnan(v)) else "must be a number or null"


ORIGINS = ("prompt", "generated", "continued")  # memory.PROMPT, GENERATED, CONTINUED


def origin(v) -> str | None:
    return None if isinstance(v, str) and v in ORIGINS else f"must be one of {', '.join(ORIGINS)}"


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
    "policy": (False, string),  # a name this wmgen may not know is refused when used, not when read
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
    "text": (False, string),
    "score": (False, score),  # null: no later token has attended to it yet
    "queries": (False, integer(0)),
}


class Unusable(Exception):
    """What is wrong with a session file, in words that name the field."""


class OtherVersion(Exception):
    """A session file of another schema version."""


def validate(record) -> dict:
    """`record` if it is a session of this schema; else Unusable (or OtherVersion)."""
    if not isinstance(record, dict):
        raise Unusable(f"it holds {_show(record)}, not a JSON object")
    version = record.get("schema_version")
    if "schema_version" not in record or not _is_int(version):
        raise Unusable(_wrong("schema_version", version, "must be an integer", missing="schema_version" not in record))
    if version != SCHEMA_VERSION:
        raise OtherVersion(version)
    _check_fields(record, FIELDS, "")
    _check_fields(record["counters"], COUNTERS, "counters.", exact=True)
    capacity, keep, evict, fill, slots = (record[k] for k in ("capacity", "keep", "evict", "fill", "slots"))
    if keep >= capacity:
        raise Unusable(f"'keep' is {_show(keep)}, must be below 'capacity' ({_show(capacity)})")
    if evict > capacity - keep:
        raise Unusable(f"'evict' is {_show(evict)}, must be at most 'capacity' - 'keep' = {_show(capacity - keep)}")
    if fill != len(slots):
        raise Unusable(f"'fill' is {_show(fill)}, but 'slots' holds {len(slots)}")
    if fill > capacity:
        raise Unusable(f"'fill' is {_show(fill)}, above 'capacity' ({_show(capacity)})")
    for i, slot in enumerate(slots):
        where = f"slots[{i}]"
        if not isinstance(slot, dict):
            raise Unusable(_wrong(where, slot, "must be an object"))
        _check_fields(slot, SLOT_FIELDS, where + ".")
        if slot["slot"] != i:
            raise Unusable(f"'{where}.slot' is {_show(slot['slot'])}, must be {i} (its place in 'slots')")
        if slot["position"] >= capacity:
            raise Unusable(f"'{where}.position' is {_show(slot['position'])}, must be below 'capacity' ({_show(capacity)})")
    return record


def _check_fields(record: dict, fields: dict[str, tuple[bool, Check]], prefix: str, exact: bool = False) -> None:
    for key, (required, check) in fields.items():
        if key not in record:
            if required:
                raise Unusable(f"'{prefix}{key}' is missing")
        elif problem := check(record[key]):
            raise Unusable(_wrong(prefix + key, record[key], problem))
    if exact and (unknown := sorted(set(record) - set(fields))):
        raise Unusable(f"'{prefix.rstrip('.')}' has an unknown key {_show(unknown[0])}")


def _wrong(field: str, value, problem: str, missing: bool = False) -> str:
    return f"'{field}' is missing" if missing else f"'{field}' is {_show(value)}, {problem}"


def _show(value) -> str:
    """A value as a short line of JSON-like text."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if _is_int(value) and abs(value) >= 10**30:
        return "a number of more than 30 digits"
    text = json.dumps(value, ensure_ascii=True)  # ASCII: no line breaks of any kind
    return text if len(text) <= 40 else text[:37] + "..."


# --- files ------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    """The session at `path`, validated. FileNotFoundError when there is none;
    Unusable or OtherVersion when what is there cannot be used."""
    try:
        text = files.utf8(files.read_regular(path, MAX_BYTES))
    except files.FileProblem as e:
        raise Unusable(f"it {e}") from None
    if not text.strip():
        raise Unusable("it is empty")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise Unusable(f"it is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise Unusable(f"it is not valid JSON ({str(e).splitlines()[0] if str(e) else 'a bad value'})") from None
    except RecursionError:
        raise Unusable("it is not valid JSON (nested too deeply)") from None
    return validate(record)


def _unusable(name: str, path: Path, e: Exception, replaced: bool = False) -> SessionError:
    """The one-line error for a session file that is there but cannot be used."""
    not_replaced = ", so it was not replaced" if replaced else ""
    if isinstance(e, OtherVersion):
        return SessionError(
            f"session '{name}' ({path}) was written by another version of wmgen "
            f"(schema {e.args[0]}, this one reads {SCHEMA_VERSION}){not_replaced}; "
            f"upgrade wmgen or delete it with: wmgen sessions --delete {name}"
        )
    fix = "move or remove it yourself" if os.path.isdir(path) else f"delete it with: wmgen sessions --delete {name}"
    return SessionError(f"session '{name}' ({path}) cannot be used: {e}{not_replaced}; {fix}")


def read(state: Path, name: str) -> dict:
    """Session `name`, validated whole against the schema; SessionError (one line)
    when it is missing or anything in it is wrong."""
    path = path_of(state, name)
    try:
        return _load(path)
    except FileNotFoundError:
        known = ", ".join(names(state)) or "none yet"
        raise SessionError(f"no session '{name}' (saved sessions: {known}); run wmgen generate first") from None
    except (Unusable, OtherVersion) as e:
        raise _unusable(name, path, e) from None


def write(state: Path, name: str, snapshot: dict) -> Path:
    """Write `snapshot` as session `name`: to a temporary file in the same folder,
    flushed to disk, then renamed over the old one, under a file lock. Refuses to
    replace a file that is not a readable session, or one made with another tokenizer
    (see `free_name`)."""
    from filelock import FileLock, Timeout

    path = path_of(state, name)
    ours = ("schema_version", "name", "saved_at", "created_at")
    record = {"schema_version": SCHEMA_VERSION, "name": name, "saved_at": now()}
    record |= {k: v for k, v in snapshot.items() if k not in ours}
    try:
        validate(record | {"created_at": record["saved_at"]})
    except (Unusable, OtherVersion) as e:
        raise SessionError(f"cannot save session '{name}': the snapshot is not valid ({e}); the previous version is untouched") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            previous = _existing(path, name, record["tokenizer"])
            record["created_at"] = previous.get("created_at") or record["saved_at"]
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(record, f, ensure_ascii=False, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(path.parent)
    except Timeout:
        raise SessionError(f"session '{name}' is locked by another wmgen; try again when it has finished") from None
    except OSError as e:
        raise SessionError(f"cannot save session '{name}' in {path.parent}: {e.strerror}; the previous version is untouched") from None
    return path


def _existing(path: Path, name: str, tokenizer: str) -> dict:
    """The session being replaced, if any. One that cannot be read, or that was made
    with another tokenizer, is not ours to overwrite: the user decides."""
    try:
        previous = _load(path)
    except FileNotFoundError:
        return {}
    except (Unusable, OtherVersion) as e:
        raise _unusable(name, path, e, replaced=True) from None
    if previous["tokenizer"] != tokenizer:
        raise SessionError(
            f"session '{name}' ({path}) was made with another tokenizer (model {previous['model']}), so it was not "
            f"replaced; save under another name or delete it with: wmgen sessions --delete {name}"
        )
    return previous


def free_name(state: Path, name: str, tokenizer: str) -> str:
    """Where a memory made with `tokenizer` can be saved without replacing anything
    the user made: `name` when no session file `name` exists or it is a readable
    session with the same tokenizer; else the first of `name-2`, `name-3`, ... that
    is."""
    check_name(name)
    for n in range(1, MAX_ALTERNATIVES + 1):
        suffix = f"-{n}" if n > 1 else ""
        candidate = name[: 64 - len(suffix)] + suffix
        if _allowed(candidate) and _takes(path_of(state, candidate), tokenizer):
            return candidate
    raise SessionError(
        f"session '{name}' and '{name}-2' to '{name}-{MAX_ALTERNATIVES}' are all taken by sessions of another "
        "tokenizer or by unreadable files; clean up with: wmgen sessions (and wmgen sessions --delete NAME)"
    )


def _takes(path: Path, tokenizer: str) -> bool:
    """Whether a memory made with `tokenizer` may be saved at `path`."""
    try:
        return _load(path)["tokenizer"] == tokenizer
    except FileNotFoundError:
        return True
    except (Unusable, OtherVersion):
        return False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def names(state: Path) -> list[str]:
    return sorted(p.stem for p in folder(state).glob("*.json") if _allowed(p.stem))


def listing(state: Path) -> list[dict]:
    """One summary per saved session; one that cannot be used is listed with the
    reason, whatever it is."""
    out = []
    for name in names(state):
        try:
            s = read(state, name)
        except SessionError as e:
            if os.path.lexists(path_of(state, name)):  # else deleted since the folder was listed
                out.append({"name": name, "error": str(e)})
            continue
        out.append({"name": name, "model": s["model"], "fill": s["fill"], "capacity": s["capacity"],
                    "seen": s["counters"]["seen"], "saved_at": s.get("saved_at")})  # fmt: skip
    return out


def delete(state: Path, name: str) -> Path:
    path = path_of(state, name)
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise SessionError(f"session '{name}' ({path}) is a directory, not a session file; move or remove it yourself")
        path.unlink()
    except FileNotFoundError:
        raise SessionError(f"no session '{name}' to delete") from None
    except OSError as e:
        raise SessionError(f"cannot delete session '{name}' ({path}): {e.strerror}") from None
    try:
        Path(str(path) + ".lock").unlink(missing_ok=True)
    except OSError:  # a lock file is only ever a convenience
        pass
    return path


# --- memories, for the library and the command line ----------------------------------


def _state(home: str | Path | None) -> Path:
    from wmgen.settings import folder_path, state_dir

    return folder_path(home, "home") if home is not None else state_dir(os.environ)


def save(memory, name: str = "last", *, home: str | Path | None = None, fallback: bool = False) -> str:
    """Save a `WorkingMemory` as session `name`, the file `wmgen generate -c -s NAME`
    continues (in `home`, else `$WMGEN_HOME`, else the user's state folder). A name
    holding a session this memory must not replace (made with another tokenizer,
    or unreadable) raises `SessionError`, or with `fallback` takes the next free
    name (`name-2`, ...). Returns the name used."""
    from wmgen.settings import flag, instance

    instance(memory, "wmgen.memory", "WorkingMemory", "memory")
    state, fallback = _state(home), flag(fallback, "fallback")
    check_name(name)
    snapshot = memory.snapshot()
    used = free_name(state, name, snapshot.get("tokenizer")) if fallback else name
    write(state, used, snapshot)
    return used


def load(name: str, model, *, capacity: int | None = None, keep: int | None = None, evict: int | None = None,
         policy: str | None = None, recent: int | None = None, home: str | Path | None = None):  # fmt: skip
    """Session `name` as a `WorkingMemory` of `model` (a `wmgen.Model`), ready to
    continue as `wmgen generate -c` does. It keeps the session's shape and policy
    unless `capacity`, `keep`, `evict` (tokens), `policy` or `recent` is given; see
    `Model.restore`."""
    from wmgen.settings import instance

    instance(model, "wmgen.api", "Model", "model")
    snapshot = read(_state(home), check_name(name))
    return model.restore(snapshot, capacity=capacity, keep=keep, evict=evict, policy=policy, recent=recent,
                         source=f"session '{name}'")  # fmt: skip
