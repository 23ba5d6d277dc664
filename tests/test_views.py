"""What wmgen prints stays what it claims to be, whatever a session file holds:
JSON on stdout is strict JSON (no NaN or Infinity, valid UTF-8), a one-line place
(a header row, a listing line) stays one line, a view names the session the user
asked for, and an absent value is never shown as "None".

Sessions are made by a real `wmgen generate`, then edited the way a user (or a bug)
could leave them: infinite and huge scores, -inf log-probabilities, line breaks,
terminal escapes and markup in strings, optional keys removed.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import ok
from wmgen.cli import app

runner = CliRunner()
PROMPT = "The lighthouse keeper climbed the stairs every evening"
HEADER_KEYS = ("session", "model", "fill", "pinned", "evict", "policy", "evictions", "tokens seen", "kv held", "saved")


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def strict(text: str):
    """`text` parsed as RFC 8259 JSON: NaN, Infinity and -Infinity are refused."""
    return json.loads(text, parse_constant=refuse)


def session_file(name: str = "last") -> Path:
    return Path(os.environ["WMGEN_HOME"]) / "sessions" / f"{name}.json"


def write_session(record: dict, name: str = "last") -> None:
    # json.dumps writes inf as Infinity, as a careless writer would; a lone surrogate as \\udce9
    session_file(name).write_text(json.dumps(record), encoding="utf-8")


@pytest.fixture(scope="module")
def made_once(tiny_dir, tmp_path_factory) -> bytes:
    """A session of the attention policy that evicted, from one real run."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMGEN_HOME", str(folder))
        ok(invoke("generate", "-m", str(tiny_dir), "--policy", "attention", "--capacity", "16", "--keep", "2",
                  "--evict", "4", "-n", "20", "-t", "0", "--ignore-eos", PROMPT))
    return (folder / "sessions" / "last.json").read_bytes()


@pytest.fixture
def record(made_once) -> dict:
    """Session 'last' in this test's WMGEN_HOME, as data to edit."""
    session_file().parent.mkdir(parents=True, exist_ok=True)
    session_file().write_bytes(made_once)
    return json.loads(made_once)


def with_infinities(record: dict) -> dict:
    """A score of +inf (as earlier versions could write), a log-probability of -inf."""
    slots = [dict(s) for s in record["slots"]]
    slots[0]["score"] = math.inf
    generated = next(i for i, s in enumerate(slots) if s["origin"] == "generated")
    slots[generated]["logprob"] = -math.inf
    return record | {"slots": slots}


# --- strict JSON from every command that prints JSON -------------------------------------


def test_inspect_memory_json_is_strict_json_when_scores_are_infinite(record):
    write_session(with_infinities(record))
    assert "Infinity" in session_file().read_text(), "the session should hold the non-JSON constants"
    data = strict(ok(invoke("inspect-memory", "--json")))
    assert data["slots"][0]["score"] is None, "an infinite score is null"
    assert None in [s["logprob"] for s in data["slots"] if s["origin"] == "generated"]
    assert [s["token"] for s in data["slots"]] == [s["token"] for s in record["slots"]]


def test_inspect_memory_attention_json_is_strict_json(record):
    write_session(with_infinities(record))
    data = strict(ok(invoke("inspect-memory", "--attention", "--json", "--tail", "4")))
    assert len(data["slots"]) == 4 and len(data["attention"]["shares"]) == record["fill"]


def test_a_score_written_as_1e999_is_printed_as_null(record):
    text = json.dumps(record).replace('"score": null', '"score": 1e999', 1)
    assert "1e999" in text
    session_file().write_text(text, encoding="utf-8")
    data = strict(ok(invoke("inspect-memory", "--json")))
    assert all(s["score"] is None or math.isfinite(s["score"]) for s in data["slots"])


def test_sessions_json_is_strict_json(record):
    write_session(with_infinities(record), "scored")
    rows = strict(ok(invoke("sessions", "--json")))
    assert sorted(r["name"] for r in rows) == ["last", "scored"]


@pytest.mark.parametrize("command", [("inspect-memory", "--json"), ("sessions", "--json")])
def test_a_lone_surrogate_in_a_session_is_printed_as_an_escape(record, command):
    write_session(record | {"model": "bad \udce9 name"})
    result = invoke(*command)
    out = ok(result)
    result.stdout_bytes.decode("utf-8")  # valid UTF-8
    data = strict(out)
    model = data["model"] if isinstance(data, dict) else data[0]["model"]
    assert model == "bad \udce9 name"


@pytest.fixture
def minus_infinity(monkeypatch):
    """Every sampled token gets a log-probability of -inf (a float16 underflow does it)."""
    import wmgen.generation

    monkeypatch.setattr(wmgen.generation, "logprob", lambda logits, token: -math.inf)


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_generate_json_is_strict_json_with_minus_infinite_logprobs(tiny_dir, minus_infinity, fmt):
    out = ok(invoke("generate", "-m", str(tiny_dir), "-n", "4", "-t", "0", "--ignore-eos", "--format", fmt, PROMPT))
    docs = [strict(out)] if fmt == "json" else [strict(line) for line in out.splitlines()]
    if fmt == "json":
        assert docs[0]["logprobs"] == [None] * 4
    else:
        assert [d["logprob"] for d in docs if d["type"] == "token"] == [None] * 4


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_generate_each_line_json_is_strict_json(tiny_dir, minus_infinity, fmt):
    out = ok(invoke("generate", "-m", str(tiny_dir), "-n", "3", "-t", "0", "--ignore-eos", "--format", fmt, "--each-line",
                    input="one\ntwo\n"))
    docs = strict(out) if fmt == "json" else [strict(line) for line in out.splitlines()]
    assert [d["logprobs"] for d in docs] == [[None] * 3] * 2


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_generate_continuing_an_infinite_session_prints_strict_json(tiny_dir, record, fmt):
    write_session(with_infinities(record))
    out = ok(invoke("generate", "-m", str(tiny_dir), "-c", "-n", "3", "-t", "0", "--ignore-eos", "--format", fmt, " more"))
    if fmt == "json":
        strict(out)
    else:
        [strict(line) for line in out.splitlines()]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"Sentence {i} is here." for i in range(12)), encoding="utf-8")
    return path


def test_perplexity_json_is_strict_json_when_a_token_is_impossible(tiny_dir, text_file, monkeypatch):
    import wmgen.perplexity

    real = wmgen.perplexity.token_logprobs

    def with_an_impossible_token(*args, **kwargs):
        logprobs = real(*args, **kwargs)
        logprobs[0] = -math.inf
        return logprobs

    monkeypatch.setattr(wmgen.perplexity, "token_logprobs", with_an_impossible_token)
    data = strict(ok(invoke("perplexity", str(text_file), "-m", str(tiny_dir), "--json", "-q")))
    assert data["perplexity"] is None and data["nll"] is None
    rows = strict(ok(invoke("perplexity", str(text_file), "-m", str(tiny_dir), "--json", "-q", "--sweep", "capacity=8,16")))
    assert [r["perplexity"] for r in rows] == [None, None]
    assert "inf" in ok(invoke("perplexity", str(text_file), "-m", str(tiny_dir), "-q")), "the text view still says it"


def test_the_json_writer_turns_every_non_finite_float_into_null():
    from wmgen.render import json_text

    value = {"a": [math.inf, -math.inf, math.nan, 1.5, (2.0, math.nan)], "b": {"c": math.inf}, "d": 10**400}
    assert strict(json_text(value)) == {"a": [None, None, None, 1.5, [2.0, None]], "b": {"c": None}, "d": 10**400}


# --- the name the user asked for -------------------------------------------------------------


def header(out: str, key: str) -> str:
    for line in out.splitlines():
        if line.startswith(key + " "):
            return line[len(key) :].strip()
    raise AssertionError(f"no {key!r} line in:\n{out}")


def test_inspect_memory_of_a_copied_session_shows_the_name_asked_for(record):
    session_file("story").write_text(session_file().read_text())
    assert record["name"] == "last"
    assert header(ok(invoke("inspect-memory", "-s", "story")), "session") == "story"
    assert strict(ok(invoke("inspect-memory", "-s", "story", "--json")))["name"] == "story"
    assert header(ok(invoke("inspect-memory")), "session") == "last"


# --- one-line places stay one line ----------------------------------------------------------

NASTY = [
    "two\nlines", "carriage\rreturn", "crlf\r\nline", "tab\there", "nul\x00byte", "escape \x1b[31mred\x1b[0m",
    "vertical\x0btab", "form\x0cfeed", "next\x85line", "line\u2028separator", "paragraph\u2029separator",
    "bidi \u202eevil", "[/x] markup [bold]", "delete\x7f",
]


def assert_one_line_places(out: str) -> None:
    lines = out.splitlines()
    keys = [line.split("  ")[0] for line in lines[: lines.index(next(line for line in lines if line.startswith("slot")))]]
    assert keys == [k for k in HEADER_KEYS], f"the header has lines it should not:\n{out}"
    assert "\x1b" not in out


@pytest.mark.parametrize("nasty", NASTY)
def test_a_control_character_in_a_sessions_strings_adds_no_header_line(record, nasty):
    write_session(record | {"model": f"model {nasty}", "saved_at": f"saved {nasty}"})
    out = ok(invoke("inspect-memory"))
    assert_one_line_places(out)
    assert header(out, "model").startswith("model ")
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in out.replace("\n", ""))


@pytest.mark.parametrize("nasty", NASTY)
def test_a_model_name_with_a_control_character_adds_no_header_line(record, nasty):
    write_session(record | {"model": f"lru {nasty}"})
    out = ok(invoke("inspect-memory"))
    assert_one_line_places(out)
    assert header(out, "model").startswith("lru ")


@pytest.mark.parametrize("nasty", NASTY)
def test_an_unknown_policy_with_a_control_character_is_a_one_line_refusal(record, nasty):
    write_session(record | {"policy": f"lru {nasty}"})
    result = invoke("inspect-memory")
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "'policy' is \"lru " in result.stderr and "cannot be used" in result.stderr


@pytest.mark.parametrize("nasty", NASTY)
def test_the_piped_listing_is_one_line_of_five_fields_per_session(record, nasty):
    write_session(record | {"model": f"model {nasty}", "saved_at": f"at {nasty}"}, "nasty")
    out = ok(invoke("sessions"))
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["last", "nasty"], out
    assert all(len(line.split("\t")) == 5 for line in lines), out
    model = lines[1].split("\t")[1]
    assert model.startswith("model ") and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in model)


def test_a_token_text_with_control_characters_stays_on_its_row(record):
    slots = [dict(s) for s in record["slots"]]
    slots[3]["text"] = "a\x1b[2Jb\x0bc\u2028d\x85e"
    write_session(record | {"slots": slots})
    out = ok(invoke("inspect-memory"))
    assert "\x1b" not in out
    rows = [line for line in out.splitlines() if line.split()[:1] == ["3"]]
    assert len(rows) == 1 and "\\x1b[2Jb" in rows[0], out


def test_very_long_strings_are_cut_in_the_header_and_kept_whole_in_the_pipe(record):
    long = "/models/" + "x" * 5000 + "/the-end"
    write_session(record | {"model": long})
    out = ok(invoke("inspect-memory"))
    assert_one_line_places(out)
    shown = header(out, "model")
    assert len(shown) <= 100 and shown.startswith("/models/x") and shown.endswith("/the-end") and "…" in shown
    assert ok(invoke("sessions")).split("\t")[1] == long, "the piped listing cuts nothing"


def test_markup_in_a_model_name_is_shown_as_written(record):
    write_session(record | {"model": "[/red] [bold]not bold"})
    assert header(ok(invoke("inspect-memory")), "model") == "[/red] [bold]not bold"


def test_huge_numbers_in_a_session_are_a_short_one_line_refusal(record):
    slots = [dict(s) for s in record["slots"]]
    slots[0]["score"] = 1.7976931348623157e308
    for change in ({"kv_bytes": 10**400}, {"slots": slots}):
        write_session(with_infinities(record) | change)
        result = invoke("inspect-memory")
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1 and len(result.stderr) < 400, result.stderr


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=())), st.integers(min_value=1, max_value=60))
def test_one_line_is_one_line_of_at_most_width_characters(text, width):
    from wmgen.render import one_line

    shown = one_line(text, width)
    assert len(shown.splitlines()) <= 1
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in shown)
    assert len(shown) <= width
    whole = one_line(text)
    assert len(whole) >= len(text) and (shown == whole or "…" in shown)
    if len(whole) <= width:
        assert shown == whole


def test_one_line_keeps_the_head_and_the_tail():
    from wmgen.render import one_line

    assert one_line("a\nb\tc\x1bd") == "a\\nb\\tc\\x1bd"
    assert one_line("0123456789abcdefghij", 11) == "01234…fghij"


# --- an absent value is never "None" --------------------------------------------------------


def test_an_attention_session_without_recent_says_so_without_none(record):
    assert record["policy"] == "attention"
    write_session({k: v for k, v in record.items() if k != "recent"})
    out = ok(invoke("inspect-memory"))
    assert "None" not in out
    assert header(out, "policy").startswith("attention (the least attended go")


OPTIONAL = ("name", "saved_at", "created_at", "sampling", "text", "policy", "recent")


@pytest.mark.parametrize("missing", OPTIONAL)
def test_a_session_without_an_optional_key_shows_no_none(record, missing):
    write_session({k: v for k, v in record.items() if k != missing})
    for args in (("inspect-memory",), ("inspect-memory", "--attention"), ("sessions",)):
        assert "None" not in ok(invoke(*args)), args


def test_null_and_missing_slot_values_show_no_none(record):
    slots = [{k: v for k, v in s.items() if k not in ("text", "score", "queries")} | {"logprob": None} for s in record["slots"]]
    write_session(record | {"slots": slots, "sampling": None, "prompt_tokens": None, "unread": None})
    assert "None" not in ok(invoke("inspect-memory"))


def test_a_listing_of_a_session_without_saved_at_has_an_empty_field(record):
    write_session({k: v for k, v in record.items() if k != "saved_at"})
    line = ok(invoke("sessions"))
    assert line.rstrip("\n").split("\t")[4] == ""
