"""`wmgen generate --server URL`: the run goes to a `wmgen serve`, and what comes
back is written exactly as a local run writes it (the same writers, from the same
events), so a shell loop pays no start-up. Only the standard library: no torch, no
tokenizer, nothing to load.

The server's `POST /v1/wmgen/generate` streams the `--format jsonl` records of
the run (after one `request` record with the run's id); they are turned back
into wmgen's events here. Ctrl-C asks the server to stop the run (`DELETE
/v1/wmgen/requests/ID`), as a local Ctrl-C stops generation: what was generated
is kept, saved and written, and the exit status is 130.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import fields
from types import SimpleNamespace

from wmgen.errors import SessionError, UsageError, WmgenError
from wmgen.events import Evicted, Finished, Started, Token

TIMEOUT_S = 3600  # a long run streams a token at a time; only a silent server times out


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url) < 8:
        raise UsageError(f"--server {url!r}: give the server's URL, such as http://127.0.0.1:8000")
    return url.rstrip("/")


def _request(url: str, method: str = "GET", body: dict | None = None, api_key: str | None = None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode("utf-8")
    return urllib.request.Request(url, data=data, method=method, headers=headers)


def open_run(url: str, body: dict, api_key: str | None):
    """The server's streamed answer to one run, or a one-line error."""
    try:
        return urllib.request.urlopen(_request(f"{url}/v1/wmgen/generate", "POST", body, api_key), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise refused(url, e.code, e.read(), e.headers.get("Retry-After")) from None
    except urllib.error.URLError as e:
        raise WmgenError(f"cannot reach the server at {url}: {getattr(e.reason, 'strerror', None) or e.reason} (is wmgen serve running?)") from None
    except OSError as e:
        raise WmgenError(f"cannot reach the server at {url}: {e.strerror or e}") from None


def refused(url: str, status: int, payload: bytes, retry_after: str | None) -> WmgenError:
    """The server's error, as the error a local run would raise (same exit code)."""
    try:
        error = json.loads(payload)["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = payload[:200].decode("utf-8", "replace").strip() or f"status {status}", None
    if status == 401:
        return UsageError(f"the server at {url} wants an API key: set WMGEN_API_KEY ({message})")
    if status in (429, 503):
        return WmgenError(f"the server at {url} is busy: {message}" + (f" (retry after {retry_after} s)" if retry_after else ""))
    if status == 404 or param == "session":
        return SessionError(message)
    if 400 <= status < 500:
        option = f"--{param.replace('_', '-')}" if isinstance(param, str) and param != "prompt" else None
        return UsageError(f"{option}: {message}" if option and not message.startswith(option) else message)
    return WmgenError(f"the server at {url} failed: {message}")


def stop_run(url: str, run_id: str, api_key: str | None) -> None:
    try:
        urllib.request.urlopen(_request(f"{url}/v1/wmgen/requests/{run_id}", "DELETE", None, api_key), timeout=10).close()
    except (urllib.error.URLError, OSError):
        pass  # the run may have ended meanwhile


def records(response, url: str) -> Iterator[dict]:
    """The JSON Lines of a streamed answer."""
    while True:
        try:
            line = response.readline()
        except OSError as e:
            raise WmgenError(f"the server at {url} went away mid-run: {e}") from None
        if not line:
            return
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                raise WmgenError(f"the server at {url} sent something that is not wmgen's: {line[:80]!r}") from None


def _event(kind, record: dict):
    names = {f.name for f in fields(kind)}
    values = {k: v for k, v in record.items() if k in names}
    if kind is Evicted:
        values["positions"] = tuple(values.get("positions", ()))
    if kind is Token:
        values.setdefault("evicted", 0)
    return kind(**values)


class RemoteRun:
    """One run on a server: `about` (the model and settings, from its start
    record), `shape` (the memory's), its events, and what the end said about the
    session (`saved`)."""

    def __init__(self, url: str, body: dict, api_key: str | None, should_stop):
        self.url, self.api_key, self.should_stop = url, api_key, should_stop
        self.response = open_run(url, body, api_key)
        self.lines = records(self.response, url)
        self.id: str | None = None
        self.saved: dict = {}
        self._first: dict | None = None
        for record in self.lines:
            if record.get("type") == "request":
                self.id = record.get("id")
                continue
            self._check(record)
            self._first = record
            break
        if self._first is None or self._first.get("type") != "start":
            raise WmgenError(f"the server at {url} ended the run before it began")
        start: dict = self._first
        self.about: dict = {"model": start.get("model"), "settings": start.get("settings") or {}}
        memory = self.about["settings"].get("memory") or {}
        self.shape = SimpleNamespace(capacity=memory.get("capacity", 0), keep=memory.get("keep", 0))
        self._stopping = False

    def _check(self, record: dict) -> None:
        if record.get("type") == "error":
            status = record.get("status", 500)
            raise refused(self.url, status if isinstance(status, int) else 500, json.dumps({"error": record}).encode(), None)

    def events(self) -> Iterator:
        kinds = {"start": Started, "token": Token, "eviction": Evicted, "end": Finished}
        pending: list[dict] = [self._first] if self._first is not None else []
        try:
            for record in self._all(pending):
                self._check(record)
                kind = kinds.get(str(record.get("type")))
                if kind is None:
                    continue
                if kind is Finished:
                    self.saved = {k: record[k] for k in ("saved", "session", "save_error", "conflict") if k in record}
                yield _event(kind, record)
                if not self._stopping and self.should_stop() and self.id:
                    self._stopping = True
                    stop_run(self.url, self.id, self.api_key)
        finally:
            self.response.close()

    def _all(self, pending: list[dict]) -> Iterator[dict]:
        yield from pending
        yield from self.lines
