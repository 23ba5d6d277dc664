"""`wmgen memory ...` on saved sessions, through the real CLI: each edit is saved
atomically and undoable, a refused edit changes nothing, fork and undo touch no other
session; a continued edited session is exact. Also: schema-1 sessions load and
continue, and a run split in two gives the slots of the run in one piece."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import ok, one_line_error
from wmgen.cli import app

runner = CliRunner()
PROMPT = "The lighthouse keeper climbed the stairs"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def session_file(name: str = "last"):
    from pathlib import Path

    return Path(os.environ["WMGEN_HOME"]) / "sessions" / f"{name}.json"


def record(name: str = "last") -> dict:
    return json.loads(session_file(name).read_text(encoding="utf-8"))


@pytest.fixture
def made(tiny_dir):
    ok(invoke("generate", "-m", str(tiny_dir), "-n", "12", "-t", "0", "--ignore-eos", "--capacity", "48", "--keep", "2", "--evict", "8", PROMPT))
    return record()


def test_forget_pin_insert_and_undo_edit_the_saved_slots(made, tok):
    tokens = [s["token"] for s in made["slots"]]
    ok(invoke("memory", "forget", "last", "4-6"))
    assert [s["token"] for s in record()["slots"]] == tokens[:4] + tokens[7:]
    ok(invoke("memory", "pin", "last", "8-9"))
    assert [i for i, s in enumerate(record()["slots"]) if s["pinned"]] == [0, 1, 8, 9]
    ok(invoke("memory", "insert", "last", "3", " a fact"))
    after = record()
    inserted = tok.encode(" a fact").ids
    assert [s["token"] for s in after["slots"]][3 : 3 + len(inserted)] == inserted
    assert {s["origin"] for s in after["slots"][3 : 3 + len(inserted)]} == {"inserted"}
    assert after["text"].startswith(tok.decode(tokens[:3]) + " a fact")
    ok(invoke("memory", "undo", "last"))
    assert [s["token"] for s in record()["slots"]] == tokens[:4] + tokens[7:], "undo goes back one edit"
    ok(invoke("memory", "undo", "last"))
    assert record()["fill"] == after["fill"], "undo again redoes"


@pytest.mark.parametrize("args, code", [
    (("forget", "last", "9-3"), 2),          # reversed
    (("forget", "last", "0-999"), 2),        # out of range
    (("forget", "last", "x"), 2),            # not a span
    (("forget", "last", "0-1"), 2),          # pinned, not asked for
    (("pin", "last", "0-46"), 2),            # no room left to roll
    (("insert", "last", "999", "text"), 2),  # no such slot
    (("forget", "nothere", "1"), 1),         # no such session
    (("undo", "last"), 1),                   # no edit to undo yet
])
def test_a_bad_edit_is_one_line_and_the_session_is_unchanged(made, args, code):
    before = session_file().read_bytes()
    one_line_error(invoke("memory", *args), code)
    assert session_file().read_bytes() == before


def test_forgetting_pinned_slots_needs_the_flag(made):
    ok(invoke("memory", "forget", "last", "0-1", "--pinned"))
    assert record()["fill"] == made["fill"] - 2


def test_fork_and_undo_never_touch_another_session(made):
    ok(invoke("memory", "fork", "last", "alt"))
    original = session_file().read_bytes()
    ok(invoke("memory", "forget", "alt", "3-5"))
    ok(invoke("memory", "undo", "alt"))
    assert session_file().read_bytes() == original
    assert record("alt")["slots"] == record()["slots"]
    one_line_error(invoke("memory", "fork", "last", "alt"), 1)  # exists already


def test_diff_shows_exactly_what_was_forgotten(made):
    ok(invoke("memory", "fork", "last", "alt"))
    ok(invoke("memory", "forget", "alt", "5-7"))
    data = json.loads(ok(invoke("memory", "diff", "last", "alt", "--json")))
    assert (data["shared"], data["only_a"], data["only_b"]) == (made["fill"] - 3, 3, 0)
    text = ok(invoke("memory", "diff", "last", "alt"))
    assert text.startswith("--- last") and "+++ alt" in text and "@@ -" in text


def test_a_continued_edited_session_is_exact(made, tiny_dir, hf_model):
    from wmgen.api import load

    ok(invoke("memory", "forget", "last", "4-9"))
    ok(invoke("memory", "pin", "last", "5-6"))
    lm = load(str(tiny_dir))
    from wmgen import session as sessions

    mem = sessions.load("last", lm)
    tokens = mem.tokens
    logits = mem.logits()
    with torch.no_grad():
        expected = hf_model(torch.tensor([tokens])).logits[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    out = lm.generate("", memory=mem, max_new_tokens=5, temperature=0, ignore_eos=True)
    with torch.no_grad():
        greedy = hf_model.generate(torch.tensor([tokens]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(tokens):]
    assert list(out.tokens) == greedy.tolist()
    assert [i for i, s in enumerate(mem.slots) if s.pinned][:4] == [0, 1, 5, 6]


def test_a_schema_1_session_loads_and_continues(made, tiny_dir):
    """Schema 1, as the previous release wrote it: no `new`, no top-level `pinned`."""
    old = record()
    old["schema_version"] = 1
    old.pop("pinned", None)
    for s in old["slots"]:
        s.pop("new", None)
    session_file().write_text(json.dumps(old), encoding="utf-8")
    ok(invoke("inspect-memory"))
    ok(invoke("generate", "-m", str(tiny_dir), "-c", "-n", "3", "-t", "0", "--ignore-eos", " more"))
    now = record()
    assert now["schema_version"] == 2 and now["fill"] == old["fill"] + len(now["slots"]) - old["fill"]
    assert [s["token"] for s in now["slots"][: old["fill"]]] == [s["token"] for s in old["slots"]]


def test_a_run_split_in_two_gives_the_slots_and_scores_of_the_run_in_one_piece(tiny_dir):
    args = ("-m", str(tiny_dir), "--policy", "attention", "--capacity", "40", "-t", "0", "--ignore-eos")
    ok(invoke("generate", *args, "-n", "31", "-s", "whole", PROMPT))
    ok(invoke("generate", *args, "-n", "30", "-s", "split", PROMPT))
    ok(invoke("generate", "-c", "-s", "split", "-m", str(tiny_dir), "-n", "1", "-t", "0", "--ignore-eos", ""))
    whole, split = record("whole")["slots"], record("split")["slots"]
    assert [s["token"] for s in whole] == [s["token"] for s in split]
    assert [s["queries"] for s in whole] == [s["queries"] for s in split], "a query was lost across the continuation"
    for a, b in zip(whole, split):
        assert (a["score"] is None) == (b["score"] is None)
        if a["score"] is not None:
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
