"""Two continuations of one session at once never lose one: the save sees that the
session changed since `-c` read it, keeps it, and saves beside it under the next free
name (`last-2`), with a warning and `"conflict"` in the JSON output. A run never
waits for another."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ok
from wmgen import session as sessions
from wmgen.cli import app
from wmgen.errors import SessionError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROUNDS = 5


def state() -> Path:
    return Path(os.environ["WMGEN_HOME"])


def session_tokens(name: str) -> list[int]:
    return [slot["token"] for slot in sessions.read(state(), name)["slots"]]


def open_for_writing(fifo: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    """The FIFO's writing end, opened once its reader (`proc`, at `-f FIFO`) has
    opened it: by then `proc` has read its session."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert proc.poll() is None, f"wmgen ended before reading its prompt: {proc.communicate()}"
        assert time.monotonic() < deadline, "wmgen never opened its prompt"
        time.sleep(0.02)


def continue_at_once(tiny_dir, name: str, prompts: list[str], fmt: str, tmp_path: Path) -> list[tuple[dict, list[int], str]]:
    """Run `wmgen generate -c -s NAME -f FIFO` once per prompt, all at once: each
    blocks on its FIFO after reading the session, and only when every one of them
    has got there are the prompts written. Returns (what the JSON output says about
    the save, the generated token ids, stderr) per prompt."""
    procs, fifos = [], []
    for i, _ in enumerate(prompts):
        fifo = tmp_path / f"prompt-{name}-{i}"
        os.mkfifo(fifo)
        fifos.append(fifo)
        args = ["generate", "-m", str(tiny_dir), "-c", "-s", name, "-n", "40", "-t", "0", "--ignore-eos", "-q",
                "--format", fmt, "-f", str(fifo)]
        procs.append(subprocess.Popen([sys.executable, "-m", "wmgen", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}))
    ends = [open_for_writing(fifo, proc) for fifo, proc in zip(fifos, procs)]  # the barrier
    for fd, prompt in zip(ends, prompts):
        os.set_blocking(fd, True)
        os.write(fd, prompt.encode())
        os.close(fd)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        if fmt == "json":
            end = json.loads(out)
            ids = end["tokens"]
        else:
            events = [json.loads(line) for line in out.splitlines()]
            end, ids = events[-1], [e["id"] for e in events if e["type"] == "token"]
            assert end["type"] == "end"
        results.append((end, ids, err))
    return results


def test_two_continuations_at_once_both_survive_and_each_says_where(tiny_dir, tok, tmp_path):
    for round_ in range(ROUNDS):
        name, fmt = f"round{round_}", ("json", "jsonl")[round_ % 2]
        ok(runner.invoke(app, ["generate", "-m", str(tiny_dir), "-s", name, "-n", "4", "-t", "0", "--ignore-eos", "Once"]))
        before = session_tokens(name)
        (a, a_ids, a_err), (b, b_ids, b_err) = continue_at_once(tiny_dir, name, [" A", " B"], fmt, tmp_path)
        first, second = (a, b) if a["session"] == name else (b, a)
        assert a["saved"] and b["saved"], (a, b)
        assert (first["session"], second["session"]) == (name, f"{name}-2"), (a["session"], b["session"])
        assert "conflict" not in first and second["conflict"] == name
        warned = a_err if a is second else b_err
        assert warned == (f"wmgen: warning: session '{name}' was saved by another run after this one read it, "
                          f"so it is kept; this memory is saved as '{name}-2'\n"), warned
        assert (b_err if a is second else a_err) == ""
        for end, prompt, ids in ((a, " A", a_ids), (b, " B", b_ids)):
            assert len(ids) == 40
            assert session_tokens(end["session"]) == before + tok.encode(prompt).ids + ids, "each holds its own continuation"
    leftovers = [p.name for p in (state() / "sessions").iterdir() if not p.name.endswith((".json", ".json.lock"))]
    assert leftovers == [], "a temporary file was left behind"


# --- the library and the files -----------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_dir, one_torch_thread):
    import wmgen

    return wmgen.load(str(tiny_dir))


def grown(lm, memory, text: str):
    lm.generate(text, memory=memory, max_new_tokens=3, temperature=0, ignore_eos=True)
    return memory


def test_a_memory_loaded_twice_and_saved_twice_keeps_both(lm):
    import wmgen

    wmgen.sessions.save(grown(lm, lm.memory(), "Once"), "story")
    one, two = wmgen.sessions.load("story", lm), wmgen.sessions.load("story", lm)
    assert wmgen.sessions.save(grown(lm, one, " A"), "story") == "story"
    with pytest.raises(SessionError) as e:
        wmgen.sessions.save(grown(lm, two, " B"), "story")
    message = str(e.value)
    assert message.startswith("session 'story' (") and "was saved by another wmgen after this memory was read from it" in message
    assert "\n" not in message
    assert wmgen.sessions.load("story", lm).tokens == one.tokens, "the first save is untouched"
    assert sessions.store(two, "story", fallback=True) == ("story-2", "story")
    assert wmgen.sessions.load("story-2", lm).tokens == two.tokens


def test_a_memory_saved_again_and_again_replaces_its_own_session(lm):
    import wmgen

    memory = grown(lm, lm.memory(), "Once")
    for text in (" a", " b", " c"):
        assert sessions.store(grown(lm, memory, text), "chat") == ("chat", None)
    loaded = wmgen.sessions.load("chat", lm)
    assert wmgen.sessions.save(grown(lm, loaded, " d"), "chat") == "chat"
    assert wmgen.sessions.save(grown(lm, loaded, " e"), "chat") == "chat"
    assert sessions.names(state()) == ["chat"]


def test_saves_within_the_same_second_are_told_apart(lm, monkeypatch):
    monkeypatch.setattr(sessions, "now", lambda: "2026-01-01T00:00:00+00:00")
    memory = grown(lm, lm.memory(), "Once")
    sessions.save(memory, "s")
    mark = sessions.fingerprint(sessions.read(state(), "s"))
    other = sessions.load("s", lm)
    sessions.save(grown(lm, other, " more"), "s")
    assert sessions.fingerprint(sessions.read(state(), "s")) != mark
    assert sessions.store(grown(lm, memory, " mine"), "s", fallback=True) == ("s-2", "s")


def test_a_conflict_takes_a_name_that_holds_no_file_at_all(lm):
    memory = grown(lm, lm.memory(), "Once")
    sessions.save(memory, "s")
    stale = sessions.load("s", lm)
    sessions.save(grown(lm, memory, " newer"), "s")
    sessions.save(grown(lm, lm.memory(), "Someone"), "s-2")  # a readable session of the same tokenizer: still not ours
    (state() / "sessions" / "s-3.json").write_text("{not json")
    before = {n: (state() / "sessions" / f"{n}.json").read_bytes() for n in ("s", "s-2", "s-3")}
    assert sessions.store(grown(lm, stale, " late"), "s", fallback=True) == ("s-4", "s")
    assert {n: (state() / "sessions" / f"{n}.json").read_bytes() for n in ("s", "s-2", "s-3")} == before
    assert sessions.read(state(), "s-4")["name"] == "s-4"


def test_a_session_deleted_meanwhile_is_saved_in_place(lm):
    sessions.save(grown(lm, lm.memory(), "Once"), "s")
    memory = sessions.load("s", lm)
    sessions.delete(state(), "s")
    assert sessions.store(grown(lm, memory, " again"), "s", fallback=True) == ("s", None)


def test_sequential_continuations_on_the_command_line_stay_in_one_session(tiny_dir):
    ok(runner.invoke(app, ["generate", "-m", str(tiny_dir), "-n", "3", "-t", "0", "Once"]))
    for text in (" a", " b", " c"):
        result = runner.invoke(app, ["generate", "-c", "-n", "3", "-t", "0", "--format", "json", text])
        end = json.loads(ok(result))
        assert (end["saved"], end["session"], "conflict" in end, result.stderr) == (True, "last", False, "")
    assert sessions.names(state()) == ["last"]
