"""Saved working memories ("sessions"): versioned JSON files in the per-user state
folder, written atomically under a lock, validated whole when read, and never
silently replaced: not when unreadable, not when made with another tokenizer, not
when another wmgen saved it after this memory was read from it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from wmgen import files
from wmgen.diff import diff  # noqa: F401  (public as wmgen.sessions.diff)
from wmgen.errors import SessionError, UsageError
from wmgen.snapshot import SCHEMA_VERSION, OtherVersion, Unusable, validate

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
    if isinstance(record, dict) and "schema_version" not in record:
        raise Unusable("'schema_version' is missing")
    return dict(validate(record))


def _unusable(name: str, path: Path, e: Exception, replaced: bool = False) -> SessionError:
    """The one-line error for a session file that is there but cannot be used."""
    not_replaced = ", so it was not replaced" if replaced else ""
    if isinstance(e, OtherVersion):
        return SessionError(
            f"session '{name}' ({path}) was written by another version of wmgen "
            f"(schema {e.args[0]}, this one reads up to {SCHEMA_VERSION}){not_replaced}; "
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


def write(state: Path, name: str, snapshot: dict, *, undoable: bool = False, expected: str | None = None,
          fallback: bool = False) -> Path:
    """Write `snapshot` as session `name`: to a temporary file in the same folder,
    flushed to disk, then renamed over the old one, under a file lock. Refuses to
    replace a file that is not a readable session, or one made with another tokenizer
    (see `free_name`). With `undoable`, the version replaced is kept for `undo`.
    With `expected` (the `fingerprint` of session `name` as this memory read it), a
    session that another wmgen saved since is not replaced either: with `fallback`
    the snapshot goes to the first of `name-2`, `name-3`, ... that holds no file,
    else SessionError. Returns the path written."""
    return _write(state, name, snapshot, undoable, expected, fallback)[0]


def _write(state: Path, name: str, snapshot: dict, undoable: bool, expected: str | None, fallback: bool) -> tuple[Path, str]:
    """`write`, and the fingerprint of what it wrote, as `read` will see it."""
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
        created = None
        for candidate in _alternatives(name):
            path = path_of(state, candidate)
            with FileLock(str(path) + ".lock", timeout=30):
                if candidate == name:
                    previous = _existing(path, name, str(record["tokenizer"]))
                    created = previous.get("created_at")
                    if expected is not None and previous and fingerprint(previous) != expected:
                        if not fallback:
                            raise _changed(name, path)
                        continue  # another run's result: kept, and this one saved beside it
                    if undoable and previous:
                        _replace_with(undo_path(path), path.read_bytes())
                elif os.path.lexists(path):
                    continue
                record["name"] = candidate
                record["created_at"] = created or record["saved_at"]
                _sweep(path)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # as `_temporary` names it
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(record, f, ensure_ascii=False, indent=1, allow_nan=False)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    os.unlink(tmp)
                    raise
                _fsync_dir(path.parent)
                return path, _fingerprint_of(path)
    except Timeout:
        raise SessionError(f"session '{path.stem}' is locked by another wmgen; try again when it has finished") from None
    except OSError as e:
        raise SessionError(f"cannot save session '{name}' in {path.parent}: {e.strerror}; the previous version is untouched") from None
    raise SessionError(
        f"session '{name}' changed since it was read, and '{name}-2' to '{name}-{MAX_ALTERNATIVES}' are all taken; "
        "clean up with: wmgen sessions (and wmgen sessions --delete NAME)"
    )


def fingerprint(record: dict) -> str:
    """What a session held when it was read, to tell at save time whether another
    wmgen saved it since: a hash of its whole content (two saves in the same second
    still differ in their tokens or counters). A record that cannot be hashed gets
    a fingerprint nothing else has: it counts as changed."""
    try:
        text = json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return os.urandom(16).hex()
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _fingerprint_of(path: Path) -> str:
    try:
        return fingerprint(_load(path))
    except (FileNotFoundError, Unusable, OtherVersion):
        return os.urandom(16).hex()


def _changed(name: str, path: Path) -> SessionError:
    return SessionError(
        f"session '{name}' ({path}) was saved by another wmgen after this memory was read from it, so it was not "
        "replaced; save under another name, or load it again"
    )


def _alternatives(name: str):
    """`name`, then `name-2`, `name-3`, ... (cut to stay within 64 characters)."""
    for n in range(1, MAX_ALTERNATIVES + 1):
        suffix = f"-{n}" if n > 1 else ""
        candidate = name[: 64 - len(suffix)] + suffix
        if _allowed(candidate):
            yield candidate


def undo_path(path: Path) -> Path:
    """Where the version an edit replaced is kept (hidden; never listed as a session)."""
    return path.with_name(f".{path.stem}.undo")


def _replace_with(path: Path, data: bytes) -> None:
    """`path` holding `data`, atomically: a temporary file renamed into place
    (named as `_temporary` says, so that `_sweep` finds it if the process dies first)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _temporary(path: Path, name: str) -> bool:
    """Whether file `name` is a temporary made for `path` by a save: the
    file's whole name, then `tempfile`'s random part, which holds no dot, so no
    other session's temporaries match. (Before, a session's temporaries were named
    by the session alone: `.NAME.XXXXXXXX.tmp`.)"""
    random_part = r"\.[a-z0-9_]{8}\.tmp"
    legacy = re.fullmatch(rf"\.{re.escape(path.stem)}{random_part}", name) and path.suffix == ".json"
    return bool(re.fullmatch(rf"\.{re.escape(path.name)}{random_part}", name) or legacy)


def _sweep(path: Path) -> None:
    """Remove what a wmgen killed mid-save left of session file `path` and its
    undo: temporaries never renamed into place. Called under the session's lock,
    which every writer holds while its temporary exists, so none is in use."""
    try:
        found = [entry.name for entry in os.scandir(path.parent)]
    except OSError:
        return
    for kept in (path, undo_path(path)):
        for name in found:
            if _temporary(kept, name):
                try:
                    os.unlink(path.parent / name)
                except OSError:  # gone already, or not ours to remove: the save goes on
                    pass


def undo(state: Path, name: str) -> None:
    """Put back the version of session `name` that its last edit replaced; the
    edited version is kept in its place, so a second undo redoes. Touches no other
    session."""
    from filelock import FileLock

    path = path_of(state, name)
    read(state, name)  # the session itself must be there and readable
    with FileLock(str(path) + ".lock", timeout=30):
        kept = undo_path(path)
        try:
            before = files.read_regular(kept, MAX_BYTES)
            validate(json.loads(before))
        except FileNotFoundError:
            raise SessionError(f"session '{name}' has no edit to undo (wmgen memory keeps the version each edit replaced)") from None
        except (files.FileProblem, ValueError, RecursionError, Unusable, OtherVersion) as e:
            raise SessionError(f"the version of session '{name}' to undo to cannot be used ({e}); nothing was changed") from None
        now_bytes = path.read_bytes()
        _sweep(path)
        _replace_with(path, before)
        _replace_with(kept, now_bytes)


def fork(state: Path, name: str, new: str) -> Path:
    """Session `name` copied as `new`, which must not exist yet; `name` is untouched."""
    from filelock import FileLock

    record = read(state, name)
    target = path_of(state, new)
    with FileLock(str(target) + ".lock", timeout=30):
        if os.path.lexists(target):
            raise SessionError(f"session '{new}' exists already; fork to another name, or delete it with: wmgen sessions --delete {new}")
    return write(state, new, {k: v for k, v in record.items() if k != "created_at"})


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
    for candidate in _alternatives(name):
        if _takes(path_of(state, candidate), tokenizer):
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
    out: list[dict] = []
    for name in names(state):
        try:
            s = read(state, name)
        except SessionError as e:
            if os.path.lexists(path_of(state, name)):  # else deleted since the folder was listed
                out.append({"name": name, "error": str(e)})
            continue
        out.append({"name": name, "model": s["model"], "fill": s["fill"], "capacity": s["capacity"],
                    "seen": s["counters"]["seen"], "saved_at": s.get("saved_at")})
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
        undo_path(path).unlink(missing_ok=True)
    except OSError:  # a lock file, or an undo, is only ever a convenience
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
    or unreadable, or saved by another wmgen after this memory was loaded from it
    or saved to it) raises `SessionError`, or with `fallback` takes the next free
    name (`name-2`, ...). Returns the name used."""
    from wmgen.settings import flag, instance

    instance(memory, "wmgen.memory", "WorkingMemory", "memory")
    return store(memory, name, home=home, fallback=flag(fallback, "fallback"))[0]


def store(memory, name: str = "last", *, home: str | Path | None = None, fallback: bool = False) -> tuple[str, str | None]:
    """`save`, saying also whether the session changed meanwhile: the name used, and
    `name` when another wmgen had saved session `name` since this memory was read
    from it (None otherwise). Afterwards `memory.loaded_from` is the session written."""
    state = _state(home)
    check_name(name)
    snapshot = memory.snapshot()
    used = free_name(state, name, snapshot.get("tokenizer")) if fallback else name
    path = path_of(state, used).absolute()
    seen = getattr(memory, "loaded_from", None)
    expected = seen[1] if isinstance(seen, tuple) and seen[0] == path else None
    written, mark = _write(state, used, snapshot, False, expected, fallback)
    memory.loaded_from = (written.absolute(), mark)
    return written.stem, used if written.absolute() != path else None


def remember(memory, state: Path, name: str, mark: str) -> None:
    """Mark `memory` as read from session `name` when its `fingerprint` was `mark`:
    sets `memory.loaded_from` to (the session file, `mark`), which `save` checks so
    that it never replaces a session another wmgen saved meanwhile."""
    memory.loaded_from = (path_of(state, name).absolute(), mark)


def load(name: str, model, *, capacity: int | None = None, keep: int | None = None, evict: int | None = None,
         policy: str | None = None, recent: int | None = None, home: str | Path | None = None):
    """Session `name` as a `WorkingMemory` of `model` (a `wmgen.Model`), ready to
    continue as `wmgen generate -c` does. It keeps the session's shape and policy
    unless `capacity`, `keep`, `evict` (tokens), `policy` or `recent` is given; see
    `Model.restore`."""
    from wmgen.settings import instance

    instance(model, "wmgen.api", "Model", "model")
    state = _state(home)
    snapshot = read(state, check_name(name))
    mark = fingerprint(snapshot)
    memory = model.restore(snapshot, capacity=capacity, keep=keep, evict=evict, policy=policy, recent=recent,
                           source=f"session '{name}'")
    remember(memory, state, name, mark)
    return memory
