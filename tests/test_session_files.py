"""Session files as the file system and a careless editor can leave them: every field
checked once, when read, against the schema; only regular files of bounded size are
opened; nothing a user made is replaced; one bad file never hides the others.

No model runs here: snapshots are built with `wmgen.snapshot.describe`, as a memory
builds them, and files are written with `sessions.write`."""

from __future__ import annotations

import copy
import json
import math
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from wmgen import session as sessions
from wmgen.errors import SessionError
from wmgen.policies import Slot
from wmgen.snapshot import describe
from wmgen.window import Shape

TOKENIZER = "a" * 16
OTHER_TOKENIZER = "b" * 16
THIRD_TOKENIZER = "c" * 16
CAPACITY, KEEP, EVICT = 16, 2, 4
TOKENS = [464, 3726, 10109, 11, 262, 6729]
ORIGINS = ["prompt", "prompt", "prompt", "generated", "generated", "continued"]
LOGPROBS = [None, None, None, -1.25, -0.5, -math.inf]


def a_snapshot(tokenizer: str = TOKENIZER, text: str = "The lighthouse keeper") -> dict:
    """What `WorkingMemory.snapshot` gives for a 6-token memory, with what the CLI adds."""
    return describe(
        [Slot(*slot) for slot in zip(TOKENS, ORIGINS, LOGPROBS)], Shape(CAPACITY, KEEP, EVICT),
        counters={"evictions": 1, "evicted": 4, "recomputed": 6, "seen": 10},
        kv_bytes_per_token=4096, token_text=lambda t: f"<{t}>",
        model="/models/tiny", tokenizer=tokenizer, sampling={"temperature": 0.7, "top_k": 0, "seed": 7}, text=text,
    )


def saved(state: Path, name: str = "last", **kwargs) -> Path:
    return sessions.write(state, name, a_snapshot(**kwargs))


def read_error(state: Path, name: str = "last") -> str:
    """The message `read` refuses with; asserts it is a SessionError of one line."""
    with pytest.raises(SessionError) as caught:
        sessions.read(state, name)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, f"not one line: {message!r}"
    assert message.startswith(f"session '{name}'"), message
    return message


def in_thread(call, timeout: float = 10.0):
    """`call()`'s result or exception, failing the test (instead of hanging it) when it blocks."""
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{call} blocked for {timeout} s"
    return box


def unblock(fifo: Path) -> None:
    """Open the FIFO's other side, so a reader that did block finishes (cleanup only)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# --- the schema, property-based ---------------------------------------------------------

MISSING = object()  # a key removed rather than replaced

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
near_misses = st.sampled_from(
    [MISSING, -1, 0, 1, 2, 3, 4, 5, 6, 15, 16, 17, 10**9, 10**40, -(10**9), True, False, None, 2.0, 6.0, 0.5,
     math.nan, math.inf, -math.inf, "", "6", "prompt", "generated", "continued", "other", [], {}, [1],
     {"evictions": 0, "evicted": 0, "recomputed": 0, "seen": 0}]
)
values = st.one_of(near_misses, json_values)

TOP = ["schema_version", "name", "saved_at", "created_at", "capacity", "keep", "evict", "fill", "kv_bytes",
       "kv_bytes_per_token", "counters", "model", "tokenizer", "sampling", "text", "slots", "policy", "recent"]
COUNTER_KEYS = ["evictions", "evicted", "recomputed", "seen"]
SLOT_KEYS = ["slot", "position", "token", "origin", "logprob", "pinned", "new", "text", "score", "queries"]
MAX_INT = 2**53 - 1  # every count stays exact as a double (jq's numbers)
fields = st.one_of(
    st.sampled_from([(k,) for k in TOP]),
    st.sampled_from([("counters", k) for k in COUNTER_KEYS]),
    st.tuples(st.just("slots"), st.integers(0, len(TOKENS) - 1), st.sampled_from(SLOT_KEYS)),
)


def is_int(v) -> bool:
    return type(v) is int


def count(v, low: int = 0) -> bool:
    return is_int(v) and low <= v <= MAX_INT


def number(v) -> bool:
    return type(v) in (int, float) and not math.isnan(v)


def valid_slot(i: int, key: str, v) -> bool:
    """Whether slot `i` of the base snapshot is still valid with `key` set to `v`
    (an expectation written apart from the validator, from the schema's prose)."""
    if v is MISSING:
        return key in ("text", "score", "queries", "new")
    return {
        "slot": lambda: is_int(v) and v == i,
        "position": lambda: is_int(v) and 0 <= v < CAPACITY,
        "token": lambda: count(v),
        "origin": lambda: v in ("prompt", "generated", "continued", "inserted") and isinstance(v, str),
        # a log-probability: at most 0 (and float rounding), above what float32 logits can give, or -inf
        "logprob": lambda: v is None or (number(v) and (v == -math.inf or -1e4 <= v <= 1e-6)),
        "pinned": lambda: type(v) is bool,
        "new": lambda: type(v) is bool,
        "text": lambda: isinstance(v, str),
        "score": lambda: v is None or v == math.inf or (number(v) and 0 <= v <= 1 + 1e-6),  # a mean share of attention
        "queries": lambda: count(v),
    }[key]()


def valid_top(key: str, v, base: dict) -> bool:
    if v is MISSING:
        return key in ("name", "saved_at", "created_at", "sampling", "text", "policy", "recent")
    cap, keep, evict, fill = (base[k] for k in ("capacity", "keep", "evict", "fill"))
    pinned = sum(1 for s in base["slots"] if s["pinned"])
    return {
        "schema_version": lambda: is_int(v) and v in (1, 2),  # 1 is read as 2
        "capacity": lambda: count(v, 2) and keep < v and evict <= v - keep and fill <= v and pinned <= v - evict,
        "keep": lambda: count(v) and v < cap and evict <= cap - v,
        "evict": lambda: count(v, 1) and v <= cap - keep and pinned <= cap - v,
        "fill": lambda: is_int(v) and v == len(base["slots"]),
        "kv_bytes": lambda: count(v),
        "kv_bytes_per_token": lambda: count(v),
        "counters": lambda: isinstance(v, dict) and sorted(v) == sorted(COUNTER_KEYS) and all(count(x) for x in v.values()),
        "slots": lambda: isinstance(v, list) and len(v) == fill
        and all(isinstance(s, dict) and all(valid_slot(i, k, s.get(k, MISSING)) for k in SLOT_KEYS) for i, s in enumerate(v))
        and sum(1 for s in v if s["pinned"]) <= cap - evict,
        "sampling": lambda: v is None or isinstance(v, dict),
        "policy": lambda: v in ("oldest", "boundary", "attention"),
        "recent": lambda: count(v),  # bounded by the shape only under the attention policy
    }.get(key, lambda: isinstance(v, str))()


def replaced(record: dict, field: tuple, value) -> dict:
    record = copy.deepcopy(record)
    *parents, last = field
    target = record
    for p in parents:
        target = target[p]
    if value is MISSING:
        target.pop(last, None)
    else:
        target[last] = value
    return record


def label(field: tuple) -> str:
    """How a message names the field: 'capacity', 'counters.seen', 'slots[3].token'."""
    if field[0] == "slots" and len(field) == 3:
        return f"slots[{field[1]}].{field[2]}"
    return ".".join(map(str, field))


@pytest.fixture(scope="module")
def base_record(tmp_path_factory) -> dict:
    state = tmp_path_factory.mktemp("base")
    return json.loads(sessions.write(state, "last", a_snapshot()).read_text(encoding="utf-8"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=fields, value=values)
def test_any_field_set_to_any_json_value_is_read_only_if_the_schema_allows_it(tmp_path, base_record, field, value):
    record = replaced(base_record, field, value)
    path = sessions.folder(tmp_path) / "last.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")  # NaN and Infinity as Python writes them
    if field[0] == "slots" and len(field) == 3:
        expected = valid_slot(field[1], field[2], value)
    elif field[0] == "counters" and len(field) == 2:
        expected = value is not MISSING and count(value)
    else:
        expected = valid_top(field[0], value, base_record)
    event("still valid" if expected else "refused")

    if expected:
        got = sessions.read(tmp_path, "last")
        assert got["fill"] == len(got["slots"]) <= got["capacity"]
        assert 0 <= got["keep"] < got["capacity"] and 1 <= got["evict"] <= got["capacity"] - got["keep"]
        return
    message = read_error(tmp_path)
    if field == ("schema_version",) and is_int(value) and value >= 1:  # below 1 is no version at all
        assert f"schema {value}" in message and "another version of wmgen" in message, message
        return
    assert f"'{label(field)}" in message or f"'{field[0]}'" in message, f"{label(field)} is not named: {message}"
    assert message.endswith("delete it with: wmgen sessions --delete last"), message
    assert "cannot be used: " in message


@pytest.mark.parametrize(
    "field, value, named",
    [
        (("counters",), [1], "'counters' is a list of 1, must be an object"),
        (("capacity",), -5, "'capacity' is -5, must be an integer in 2..2**53-1"),
        (("capacity",), 5, "'evict' is 4, must be at most 'capacity' - 'keep' = 3"),
        (("slots",), MISSING, "'slots' is missing"),
        (("fill",), 10**9, "'fill' is 1000000000, but 'slots' holds 6"),
        (("keep",), True, "'keep' is true, must be an integer in 0..2**53-1"),
        (("capacity",), 16.0, "'capacity' is 16.0, must be an integer in 2..2**53-1"),
        (("schema_version",), MISSING, "'schema_version' is missing"),
        (("schema_version",), "1", "'schema_version' is \"1\", must be an integer"),
        (("slots", 4, "logprob"), math.nan, "'slots[4].logprob' is NaN, must be a number in [-1e4, 0], -Infinity or null"),
        (("slots", 4, "logprob"), math.inf, "'slots[4].logprob' is Infinity"),
        (("slots", 2, "origin"), "typed", "'slots[2].origin' is \"typed\", must be one of prompt, generated, continued, inserted"),
        (("slots", 2, "slot"), 7, "'slots[2].slot' is 7, must be 2"),
        (("counters", "seen"), MISSING, "'counters.seen' is missing"),
        (("counters", "extra"), 1, "'counters' has an unknown key \"extra\""),
        (("tokenizer",), None, "'tokenizer' is null, must be a string"),
    ],
)
def test_the_reported_examples_are_one_line_errors_that_name_the_field(tmp_path, field, value, named):
    path = saved(tmp_path)
    path.write_text(json.dumps(replaced(json.loads(path.read_text(encoding="utf-8")), field, value)), encoding="utf-8")
    message = read_error(tmp_path)
    assert message.startswith(f"session 'last' ({path}) cannot be used: ")
    assert named in message
    assert message.endswith("; delete it with: wmgen sessions --delete last")


def test_another_schema_version_keeps_its_own_message(tmp_path):
    path = saved(tmp_path)
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")) | {"schema_version": 3}), encoding="utf-8")
    assert read_error(tmp_path) == (
        f"session 'last' ({path}) was written by another version of wmgen (schema 3, this one reads up to 2); "
        "upgrade wmgen or delete it with: wmgen sessions --delete last"
    )


def test_policy_and_score_are_accepted_when_present_and_checked(tmp_path):
    path = saved(tmp_path)
    record = json.loads(path.read_text(encoding="utf-8"))
    record["policy"] = "attention"
    for i, slot in enumerate(record["slots"]):
        slot["score"] = None if i == 0 else 0.15 * i
    path.write_text(json.dumps(record), encoding="utf-8")
    got = sessions.read(tmp_path, "last")
    assert got["policy"] == "attention" and got["slots"][3]["score"] == 0.15 * 3

    record["slots"][3]["score"] = "high"
    path.write_text(json.dumps(record), encoding="utf-8")
    assert "'slots[3].score' is \"high\", must be a number in [0, 1] or null" in read_error(tmp_path)
    record["slots"][3]["score"], record["policy"] = 0.5, 3
    path.write_text(json.dumps(record), encoding="utf-8")
    assert "'policy' is 3, must be one of oldest, boundary, attention" in read_error(tmp_path)
    record["policy"] = "attention"
    record["slots"][3]["score"], record["slots"][3]["queries"] = 10**400, 10**400  # numbers no arithmetic here can use
    path.write_text(json.dumps(record), encoding="utf-8")
    message = read_error(tmp_path)
    assert "'slots[3].score' is a number of 401 digits" in message and len(message) < 300


def test_a_snapshot_that_would_not_read_back_is_not_written(tmp_path):
    saved(tmp_path, text="old")
    before = sessions.path_of(tmp_path, "last").read_bytes()
    bad = a_snapshot() | {"fill": 99}
    with pytest.raises(SessionError, match=r"cannot save session 'last': the snapshot is not valid \('fill' is 99"):
        sessions.write(tmp_path, "last", bad)
    assert sessions.path_of(tmp_path, "last").read_bytes() == before


# --- damaged files ------------------------------------------------------------------------


def test_a_session_file_cut_anywhere_is_a_one_line_error(tmp_path):
    path = saved(tmp_path)
    whole = path.read_bytes()
    cuts = sorted(set(range(0, len(whole), 7)) | {len(whole) - 1})  # down to the missing final '}'
    assert len(cuts) > 50
    for cut in cuts:
        path.write_bytes(whole[:cut])
        message = read_error(tmp_path)
        assert "cannot be used: " in message and ("not valid JSON" in message or "empty" in message), f"cut at {cut}: {message}"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\xff\xfe{}", "it is not UTF-8 text (bad byte at offset 0)"),
        (b"[1, 2, 3]", "it holds a list of 3, not a JSON object"),
        (b"", "it is empty"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"schema_version": 1, "capacity": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["not-utf8", "not-an-object", "empty", "nested-too-deep", "huge-integer"],
)
def test_a_file_that_is_not_a_session_object_is_a_one_line_error(tmp_path, content, reason):
    path = sessions.folder(tmp_path) / "last.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert reason in read_error(tmp_path)


def test_a_session_file_over_the_size_limit_is_refused_without_reading_it(tmp_path):
    path = saved(tmp_path)
    with path.open("r+b") as f:
        f.truncate(sessions.MAX_BYTES + 1)  # sparse: no bytes written
    message = read_error(tmp_path)
    assert f"it is larger than 64 MiB ({sessions.MAX_BYTES + 1} bytes), more than wmgen reads from such a file" in message
    with pytest.raises(SessionError, match="so it was not replaced"):
        sessions.write(tmp_path, "last", a_snapshot())
    assert path.stat().st_size == sessions.MAX_BYTES + 1


# --- what is at the path is not a file ---------------------------------------------------------


@pytest.fixture
def fifo_session(tmp_path):
    """Sessions 'good' (readable) and 'last' (a FIFO where the file should be)."""
    saved(tmp_path, "good")
    fifo = sessions.path_of(tmp_path, "last")
    os.mkfifo(fifo)
    yield fifo
    unblock(fifo)


def test_reading_a_fifo_is_refused_promptly(tmp_path, fifo_session):
    box = in_thread(lambda: sessions.read(tmp_path, "last"))
    error = box.get("error")
    assert isinstance(error, SessionError), f"expected a SessionError, got {box}"
    assert str(error) == (
        f"session 'last' ({fifo_session}) cannot be used: it is a named pipe (FIFO), not a regular file; "
        "delete it with: wmgen sessions --delete last"
    )


def test_listing_shows_the_other_sessions_and_marks_a_fifo_unreadable(tmp_path, fifo_session):
    rows = in_thread(lambda: sessions.listing(tmp_path))["value"]
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == ["good", "last"]
    assert by_name["good"]["fill"] == len(TOKENS) and by_name["good"]["capacity"] == CAPACITY
    assert by_name["good"]["seen"] == 10 and "error" not in by_name["good"]
    assert "not a regular file" in by_name["last"]["error"]


def test_writing_over_a_fifo_is_refused_without_hanging(tmp_path, fifo_session):
    box = in_thread(lambda: sessions.write(tmp_path, "last", a_snapshot()))
    assert isinstance(box.get("error"), SessionError), box
    assert "not a regular file, so it was not replaced" in str(box["error"])
    assert fifo_session.is_fifo()


def unreadable_kinds(state: Path) -> dict[str, str]:
    """Sessions that cannot be used, each for another reason: name -> what the error says."""
    folder = sessions.folder(state)
    (folder / "badjson.json").write_text("{", encoding="utf-8")
    (folder / "badfield.json").write_text(json.dumps(a_snapshot() | {"schema_version": 1, "capacity": -5}), encoding="utf-8")
    os.mkfifo(folder / "fifo.json")
    (folder / "dir.json").mkdir()
    with (folder / "huge.json").open("wb") as f:
        f.truncate(sessions.MAX_BYTES + 1)
    os.symlink(folder / "nowhere", folder / "dangling.json")
    kinds = {"badjson": "not valid JSON", "badfield": "'capacity' is -5", "fifo": "named pipe", "dir": "a folder",
             "huge": "larger than 64 MiB", "dangling": "symbolic link to a missing file"}
    if os.geteuid() != 0:  # root reads anything
        saved(state, "private")
        (folder / "private.json").chmod(0)
        kinds["private"] = "Permission denied"
    return kinds


def test_listing_lists_every_readable_session_and_each_unreadable_one_with_its_reason(tmp_path):
    saved(tmp_path, "good")
    saved(tmp_path, "other", tokenizer=OTHER_TOKENIZER)
    kinds = unreadable_kinds(tmp_path)
    rows = in_thread(lambda: sessions.listing(tmp_path))["value"]
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == sorted(["good", "other", *kinds])
    for name in ("good", "other"):
        assert by_name[name]["fill"] == len(TOKENS) and "error" not in by_name[name]
    for name, reason in kinds.items():
        error = by_name[name].get("error", "")
        assert reason in error and len(error.splitlines()) == 1, f"{name}: {by_name[name]}"
        assert error.startswith(f"session '{name}'"), error


def test_a_directory_where_a_session_should_be_is_not_deleted_and_not_an_internal_error(tmp_path):
    folder = sessions.folder(tmp_path)
    (folder / "x.json").mkdir(parents=True)
    (folder / "x.json" / "keep-me").write_text("mine", encoding="utf-8")
    with pytest.raises(SessionError) as caught:
        sessions.delete(tmp_path, "x")
    assert str(caught.value) == f"session 'x' ({folder / 'x.json'}) is a directory, not a session file; move or remove it yourself"
    assert (folder / "x.json" / "keep-me").read_text(encoding="utf-8") == "mine"
    assert read_error(tmp_path, "x").endswith("it is a folder, not a regular file; move or remove it yourself")


def test_deleting_a_fifo_session_removes_it_without_opening_it(tmp_path, fifo_session):
    box = in_thread(lambda: sessions.delete(tmp_path, "last"))
    assert box.get("value") == fifo_session, box
    assert not os.path.lexists(fifo_session)
    assert sessions.names(tmp_path) == ["good"]


# --- nothing a user made is lost ----------------------------------------------------------------


def test_writing_over_a_session_of_another_tokenizer_is_refused_and_leaves_it_byte_for_byte(tmp_path):
    path = saved(tmp_path, tokenizer=OTHER_TOKENIZER, text="theirs")
    before = path.read_bytes()
    with pytest.raises(SessionError) as caught:
        sessions.write(tmp_path, "last", a_snapshot(tokenizer=TOKENIZER, text="mine"))
    assert str(caught.value) == (
        f"session 'last' ({path}) was made with another tokenizer (model /models/tiny), so it was not replaced; "
        "save under another name or delete it with: wmgen sessions --delete last"
    )
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name != "last.json.lock"] == ["last.json"], "a temporary file was left"


def test_writing_over_a_session_whose_slots_were_removed_is_refused(tmp_path):
    path = saved(tmp_path)
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["slots"]
    path.write_text(json.dumps(record), encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(SessionError, match=r"'slots' is missing, so it was not replaced; delete it with"):
        sessions.write(tmp_path, "last", a_snapshot())
    assert path.read_bytes() == before


def test_writing_over_a_session_of_the_same_tokenizer_replaces_it_and_keeps_created_at(tmp_path):
    first = json.loads(saved(tmp_path, text="old").read_text(encoding="utf-8"))
    saved(tmp_path, text="new")
    second = sessions.read(tmp_path, "last")
    assert second["text"] == "new" and second["created_at"] == first["created_at"]


def test_free_name_steps_past_sessions_of_other_tokenizers(tmp_path):
    assert sessions.free_name(tmp_path, "last", TOKENIZER) == "last", "an unused name is free"
    saved(tmp_path, "last", tokenizer=TOKENIZER)
    assert sessions.free_name(tmp_path, "last", TOKENIZER) == "last", "the same tokenizer may replace its session"
    assert sessions.free_name(tmp_path, "last", OTHER_TOKENIZER) == "last-2"
    saved(tmp_path, "last-2", tokenizer=THIRD_TOKENIZER)
    assert sessions.free_name(tmp_path, "last", OTHER_TOKENIZER) == "last-3"
    assert sessions.free_name(tmp_path, "last", THIRD_TOKENIZER) == "last-2"
    sessions.write(tmp_path, "last-3", a_snapshot(tokenizer=OTHER_TOKENIZER))
    assert sessions.free_name(tmp_path, "last", OTHER_TOKENIZER) == "last-3"
    assert sessions.read(tmp_path, "last")["tokenizer"] == TOKENIZER, "the first session changed"


def test_free_name_steps_past_unreadable_files(tmp_path):
    folder = sessions.folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "story.json").write_text("not json", encoding="utf-8")
    os.mkfifo(folder / "story-2.json")
    try:
        assert in_thread(lambda: sessions.free_name(tmp_path, "story", TOKENIZER))["value"] == "story-3"
    finally:
        unblock(folder / "story-2.json")
    assert (folder / "story.json").read_text(encoding="utf-8") == "not json"


def test_free_name_keeps_long_names_within_the_limit(tmp_path):
    long = "x" * 64
    saved(tmp_path, long, tokenizer=OTHER_TOKENIZER)
    free = sessions.free_name(tmp_path, long, TOKENIZER)
    assert free == "x" * 62 + "-2"
    assert sessions.check_name(free) == free


def test_free_name_gives_up_with_advice_when_every_alternative_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "MAX_ALTERNATIVES", 3)
    for name in ("s", "s-2", "s-3"):
        saved(tmp_path, name, tokenizer=OTHER_TOKENIZER)
    with pytest.raises(SessionError) as caught:
        sessions.free_name(tmp_path, "s", TOKENIZER)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "'s'" in message and "'s-3'" in message
    assert "clean up with: wmgen sessions" in message


def test_names_skip_files_whose_names_read_would_refuse(tmp_path):
    saved(tmp_path, "good")
    (sessions.folder(tmp_path) / "a..b.json").write_text("{}", encoding="utf-8")
    assert sessions.names(tmp_path) == ["good"]
    assert [r["name"] for r in sessions.listing(tmp_path)] == ["good"]
