"""Saved working memories ("sessions"): versioned JSON files in the per-user state
folder, written atomically under a lock, never silently replaced when unreadable."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from wmgen.errors import SessionError, UsageError

SCHEMA_VERSION = 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"session name {name!r} is not allowed; use letters, digits, '.', '_' and '-' (no slashes, no '..', at most 64)"
        )
    return name


def folder(state: Path) -> Path:
    return state / "sessions"


def path_of(state: Path, name: str) -> Path:
    return folder(state) / f"{check_name(name)}.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(state: Path, name: str, snapshot: dict) -> Path:
    """Write `snapshot` as session `name`: to a temporary file in the same folder,
    flushed to disk, then renamed over the old one, under a file lock."""
    from filelock import FileLock, Timeout

    path = path_of(state, name)
    record = {"schema_version": SCHEMA_VERSION, "name": name, "saved_at": now(), **snapshot}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            previous = _existing(path, name)
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


def _existing(path: Path, name: str) -> dict:
    """The session being replaced, if any. One that cannot be read is not ours to
    overwrite: the user decides what happens to it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise SessionError(
            f"session '{name}' ({path}) cannot be read, so it was not replaced; "
            f"move it aside or delete it with: wmgen sessions --delete {name}"
        )
    return data


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


def read(state: Path, name: str) -> dict:
    path = path_of(state, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(names(state)) or "none yet"
        raise SessionError(f"no session '{name}' (saved sessions: {known}); run wmgen generate first") from None
    except (OSError, ValueError) as e:
        raise SessionError(
            f"session '{name}' ({path}) cannot be read ({e}); move it aside or delete it with: wmgen sessions --delete {name}"
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION or not isinstance(data.get("slots"), list):
        raise SessionError(
            f"session '{name}' ({path}) has schema version {version!r}, this wmgen reads {SCHEMA_VERSION}; "
            f"upgrade wmgen or delete it with: wmgen sessions --delete {name}"
        )
    return data


def names(state: Path) -> list[str]:
    return sorted(p.stem for p in folder(state).glob("*.json") if NAME.fullmatch(p.stem))


def listing(state: Path) -> list[dict]:
    """One summary per saved session; unreadable ones are listed as such."""
    out = []
    for name in names(state):
        try:
            s = read(state, name)
            out.append({"name": name, "model": s.get("model"), "fill": s.get("fill"), "capacity": s.get("capacity"),
                        "seen": s.get("counters", {}).get("seen"), "saved_at": s.get("saved_at")})  # fmt: skip
        except SessionError as e:
            out.append({"name": name, "error": str(e)})
    return out


def delete(state: Path, name: str) -> Path:
    path = path_of(state, name)
    try:
        path.unlink()
    except FileNotFoundError:
        raise SessionError(f"no session '{name}' to delete") from None
    except OSError as e:
        raise SessionError(f"cannot delete session '{name}': {e.strerror}") from None
    Path(str(path) + ".lock").unlink(missing_ok=True)
    return path
