"""`--trace`: the memory's ledger rebuilds what the memory held, at the end and at
every step; `wmgen timeline` draws it."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from wmgen import session as sessions
from wmgen import trace as ledger

PROMPT = "The lighthouse keeper climbed the stairs. Every evening, he lit the lamp!"


def wmgen(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wmgen", *args], capture_output=True, text=True, input=input, timeout=timeout,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def home() -> Path:
    return Path(os.environ["WMGEN_HOME"])


def slots_of(records: list[dict]) -> list[tuple]:
    return [(s["token"], s["origin"], s["pinned"]) for s in records]


@pytest.mark.parametrize("policy", ["oldest", "boundary", "attention"])
def test_a_trace_rebuilds_the_saved_session_under_every_policy(tiny_dir, tmp_path, policy):
    path = tmp_path / "t.jsonl"
    first = wmgen("generate", "-m", str(tiny_dir), "--capacity", "24", "--keep", "3", "--evict", "5", "--policy", policy,
                  "-n", "40", "-t", "0.9", "--seed", "2", "--ignore-eos", "--trace", str(path), "-s", "traced", PROMPT)
    assert first.returncode == 0, first.stderr
    events = ledger.load(str(path))
    saved = sessions.read(home(), "traced")
    assert slots_of(ledger.rebuild(events)) == slots_of(saved["slots"])
    assert sum(len(e["slots"]) for e in events if e["type"] == "evict" and e["why"] == "evict") == saved["counters"]["evicted"]
    # a continuation's trace starts from what the memory held
    again = wmgen("generate", "-m", str(tiny_dir), "-c", "-s", "traced", "-n", "30", "-t", "0.9", "--seed", "3", "--ignore-eos",
                  "--trace", str(path), " And then")
    assert again.returncode == 0, again.stderr
    events = ledger.load(str(path))
    assert events[1]["type"] == "start" and slots_of(events[1]["slots"]) == slots_of(saved["slots"])
    assert slots_of(ledger.rebuild(events)) == slots_of(sessions.read(home(), "traced")["slots"])


def test_the_ledger_rebuilds_every_step_of_a_run(loaded):
    """Stepping a memory by hand, with the trace on: at each step the rebuild is the memory."""
    import io

    import wmgen
    from wmgen.trace import Trace

    model, tokenizer, info = loaded
    lm = wmgen.load(info.name)
    memory = lm.memory(capacity=12, keep=2, evict=3, policy="attention", recent=3)
    out = io.StringIO()
    memory.trace = Trace(out, memory)
    held = []
    memory.read(lm.encode("One two three four five"))
    held.append(memory.tokens)
    for token in lm.encode(" six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"):
        memory.append(token)
        held.append(memory.tokens)
    memory.forget(3, 5)
    held.append(memory.tokens)
    memory.insert(1, lm.encode(" zero"))
    held.append(memory.tokens)
    memory.pin(4, 6)
    held.append(memory.tokens)
    events = ledger.read_events(out.getvalue().splitlines())
    steps = sorted({e["step"] for e in events if "step" in e})
    assert len(steps) == len(held)
    for step, tokens in zip(steps, held):
        assert [s["token"] for s in ledger.rebuild(events, step)] == tokens
    assert [s["pinned"] for s in ledger.rebuild(events)] == [s.pinned for s in memory.slots]
    evictions = [e for e in events if e["type"] == "evict" and e["why"] == "evict"]
    assert evictions and all(d["score"] is None or d["score"] >= 0 for e in evictions for d in e["dropped"])
    assert all(d["age"] >= 0 and d["position"] == i for e in evictions for d, i in zip(e["dropped"], e["slots"]))
    attention = [e for e in events if e["type"] == "attention"]
    assert attention and all(len(e["received"]) > 0 for e in attention)


def test_a_chat_with_edits_is_traced(tiny_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = "Hello there, how are you?\n/forget 1-2\n/pin 0\n/insert 1 again\n And more\n/undo\n/fork other\n Still here\n"
    r = wmgen("chat", "-m", str(tiny_dir), "-n", "6", "-t", "0", "--ignore-eos", "--trace", str(path), input=lines)
    assert r.returncode == 0, r.stderr
    events = ledger.load(str(path))
    kinds = {e["type"] for e in events}
    assert {"read", "evict", "pin", "restore"} <= kinds
    saved = sessions.read(home(), "other")
    assert slots_of(ledger.rebuild(events)) == slots_of(saved["slots"])


def test_an_interrupted_run_leaves_valid_json_lines(tiny_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "wmgen", "generate", "-m", str(tiny_dir), "-n", "1000000", "--ignore-eos",
                                "--capacity", "20", "--trace", str(path), "Forever"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
    for _ in range(300):  # bytes of text: a few dozen tokens
        process.stdout.read(1)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    text = path.read_text()
    assert text.endswith("\n")
    events = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert sum(e["type"] == "read" for e in events) > 10
    assert slots_of(ledger.rebuild(events)) == slots_of(sessions.read(home(), "last")["slots"])
    # a last line cut short (kill -9 mid-write) is left out, the rest read
    path.write_text(text + '{"type": "read", "st')
    assert len(ledger.load(str(path))) == len(events)


def test_the_timeline_picture_and_terminal_view(tiny_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install '.[test]')")
    path = tmp_path / "t.jsonl"
    r = wmgen("generate", "-m", str(tiny_dir), "--capacity", "16", "--evict", "4", "--policy", "attention", "-n", "30", "-t", "0",
              "--ignore-eos", "--trace", str(path), "--keep", "2", "Hello there my friend")
    assert r.returncode == 0, r.stderr
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    drawn = wmgen("timeline", str(path), "-o", str(png))
    assert drawn.returncode == 0, drawn.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert f"{width}×{height} px" in drawn.stderr and width >= 400 and height >= 300
    assert wmgen("timeline", str(path), "-o", str(svg)).returncode == 0
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and float(root.get("width").rstrip("pt")) > 100
    view = wmgen("timeline", str(path), "--no-color")
    assert view.returncode == 0
    events = ledger.load(str(path))
    reads = sum(len(e["ids"]) for e in events if e["type"] == "read")
    assert f"{reads} tokens over" in view.stdout and "▼" in view.stdout and view.stdout.count("\n*") >= 1


def test_bad_traces_and_paths_are_one_line_errors(tiny_dir, tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"type": "read"}\n')
    cases = [
        wmgen("timeline", str(tmp_path / "none.jsonl")),
        wmgen("timeline", str(junk)),
        wmgen("timeline", str(junk), "-o", str(tmp_path / "t.jpg")),
        wmgen("generate", "-m", str(tiny_dir), "-n", "2", "--trace", str(tmp_path), "x"),
        wmgen("generate", "-m", str(tiny_dir), "-n", "2", "--trace", "-", "x"),
        wmgen("generate", "-m", str(tiny_dir), "--each-line", "--trace", str(tmp_path / "t"), input="a\nb\n"),
        wmgen("perplexity", "-m", str(tiny_dir), "--trace", str(tmp_path / "t"), "--sweep", "capacity=8,16", "-", input="some text here"),
    ]
    for r in cases:
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_perplexity_trace_is_capped(tiny_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    r = wmgen("perplexity", "-m", str(tiny_dir), "--capacity", "8", "--evict", "2", "--trace", str(path), "-q", "-",
              input="word " * 300)
    assert r.returncode == 0, r.stderr
    events = ledger.load(str(path))
    assert sum(e["type"] == "evict" for e in events) > 50
    import io

    from wmgen.trace import Trace

    class Memory:  # what Trace reads of a memory
        tokenizer, model_id, slots = None, "m", []
        shape = type("S", (), {"capacity": 8, "keep": 0, "evict": 2, "policy": "oldest", "recent": None})()

    out = io.StringIO()
    t = Trace(out, Memory(), cap=5)
    for _ in range(20):
        t.begin()
        t.pin([0], True)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 5 and lines[-1]["type"] == "truncated"
