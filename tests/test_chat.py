"""`wmgen chat`: one live memory, turns and commands, through real processes.

Piped stdin (every line a turn or a command, plain output) and a real
pseudo-terminal (pexpect: the prompt, Ctrl-C, Ctrl-D, tab completion, the
history file). Every run is `python -m wmgen chat` with this test's `WMGEN_HOME`,
one torch thread and a timeout, on the tiny random checkpoint of conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wmgen.errors import UsageError
from wmgen.spans import parse_span, show_span

TIMEOUT = 90
FIRST = "The lighthouse keeper climbed the stairs"


# --- helpers ---------------------------------------------------------------------


def home() -> Path:
    return Path(os.environ["WMGEN_HOME"])


def saved(name: str = "last") -> dict:
    return json.loads((home() / "sessions" / f"{name}.json").read_text(encoding="utf-8"))


def tokens(snap: dict) -> list[int]:
    return [s["token"] for s in snap["slots"]]


def environ() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def chat(model: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`wmgen chat --model MODEL ARGS` fed `script` on a pipe; stdout and stderr as text."""
    argv = [sys.executable, "-m", "wmgen", "chat", "--model", str(model), *args]
    result = subprocess.run(argv, input=script.encode(), capture_output=True, timeout=TIMEOUT, env=environ())
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def succeeded(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return result


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("wmgen: error:")]


GREEDY = ("-t", "0", "--ignore-eos", "--seed", "1")


# --- spans ----------------------------------------------------------------------


def test_a_span_is_inclusive_and_becomes_half_open():
    assert parse_span("3-5", 10) == (3, 6)
    assert parse_span("7", 10) == (7, 8)
    assert parse_span("0-9", 10) == (0, 10)
    assert show_span(3, 6) == "3-5" and show_span(7, 8) == "7"


@pytest.mark.parametrize("text, fill, says", [
    ("5-3", 10, "reversed"), ("3-10", 10, "out of range"), ("10", 10, "out of range"), ("a-b", 10, "not a span"),
    ("-3", 10, "not a span"), ("3-", 10, "not a span"), ("", 10, "not a span"), ("0", 0, "empty"),
])
def test_a_bad_span_is_a_usage_error_that_says_why(text, fill, says):
    with pytest.raises(UsageError, match=says):
        parse_span(text, fill)


# --- piped: turns ------------------------------------------------------------------


def test_turns_append_to_memory_typed_text_then_continuation_in_order(tiny_dir, tok):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n and then\n", "-n", "5", *GREEDY))

    snap = saved()
    origins = [s["origin"] for s in snap["slots"]]
    first, second = tok.encode(FIRST).ids, tok.encode(" and then").ids
    assert origins == ["prompt"] * len(first) + ["generated"] * 5 + ["continued"] * len(second) + ["generated"] * 5
    ids = tokens(snap)
    assert ids[: len(first)] == first and ids[len(first) + 5 : len(first) + 5 + len(second)] == second
    replies = tok.decode(ids[len(first) : len(first) + 5]), tok.decode(ids[-5:])
    assert result.stdout == f"{replies[0]}\n{replies[1]}\n", "stdout: each turn's text, then a newline"
    assert result.stderr == "", f"a quiet script's stderr should be empty: {result.stderr!r}"


def test_a_turn_recomputes_nothing_that_did_not_change(tiny_dir):
    succeeded(chat(tiny_dir, "One\n two\n three\n", "-n", "4", *GREEDY))
    counters = saved()["counters"]
    assert counters["recomputed"] == 0 and counters["evictions"] == 0, counters


def test_continue_reads_the_saved_memory_and_saves_back_to_it(tiny_dir):
    succeeded(chat(tiny_dir, f"{FIRST}\n", "-n", "3", *GREEDY))
    before = tokens(saved())
    succeeded(chat(tiny_dir, " more\n", "-c", "-n", "3", *GREEDY))
    after = tokens(saved())
    assert after[: len(before)] == before and len(after) > len(before) + 3


def test_a_session_name_starts_from_that_session_and_saves_to_it(tiny_dir):
    succeeded(chat(tiny_dir, f"{FIRST}\n", "-s", "story", "-n", "3", *GREEDY))
    first = tokens(saved("story"))
    succeeded(chat(tiny_dir, " again\n", "-s", "story", "-n", "3", *GREEDY))
    assert tokens(saved("story"))[: len(first)] == first
    assert not (home() / "sessions" / "last.json").exists(), "-s NAME saves to NAME only"


def test_exit_saves_and_leaves_and_reads_no_more_lines(tiny_dir, tok):
    succeeded(chat(tiny_dir, f"{FIRST}\n/exit\n never read\n", "-s", "mine", "-n", "3", *GREEDY))
    assert "never" not in tok.decode(tokens(saved("mine")))


def test_a_chat_that_changed_nothing_replaces_nothing(tiny_dir):
    succeeded(chat(tiny_dir, f"{FIRST}\n", "-n", "3", *GREEDY))
    before = saved()
    succeeded(chat(tiny_dir, "/show\n/stats\n"))  # a fresh memory, never used: 'last' is left alone
    assert saved() == before


def test_evictions_are_announced_on_stderr_with_the_policy(tiny_dir):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n", "--capacity", "16", "--evict", "4", "-n", "30", *GREEDY))
    notices = [line for line in result.stderr.splitlines() if "evicted" in line]
    assert len(notices) == 1, result.stderr
    snap = saved()
    assert "by policy oldest" in notices[0] and f"fill {snap['fill']}/16" in notices[0], notices[0]
    assert f"evicted {snap['counters']['evicted']} tokens" in notices[0], (notices[0], snap["counters"])


def test_quiet_keeps_notices_off_stderr(tiny_dir):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n", "-q", "--capacity", "16", "--evict", "4", "-n", "30", *GREEDY))
    assert result.stderr == ""


# --- piped: commands ----------------------------------------------------------------


def test_a_bad_command_or_span_is_one_line_and_the_chat_goes_on(tiny_dir):
    script = f"{FIRST}\n/frobnicate\n/forget 99-100\n/forget 5-2\n/pin x\n/set temperature hot\n/insert\n and then\n"
    result = succeeded(chat(tiny_dir, script, "-n", "3", *GREEDY))
    assert len(errors(result)) == 6, result.stderr
    assert len(result.stderr.splitlines()) == 6, f"one line per bad command, nothing else:\n{result.stderr}"
    assert "/help" in errors(result)[0]
    origins = [s["origin"] for s in saved()["slots"]]
    assert origins.count("generated") == 6 and "continued" in origins, "the memory changed by a bad command, or a turn was lost"


def test_forget_undo_and_fork_keep_sessions_apart(tiny_dir):
    script = f"{FIRST}\n/save turn1\n/forget 1-2\n/save forgot\n/undo\n/fork branch\n and then\n"
    result = succeeded(chat(tiny_dir, script, "-n", "3", *GREEDY))

    turn1 = tokens(saved("turn1"))
    assert tokens(saved("forgot")) == turn1[:1] + turn1[3:]
    assert tokens(saved("last")) == turn1, "the original session changed after the fork"
    branch = tokens(saved("branch"))
    assert branch[: len(turn1)] == turn1 and len(branch) > len(turn1) + 3
    assert "forgot 2 slots (1-2)" in result.stderr and "undid /forget 1-2" in result.stderr
    assert "session 'branch'" in result.stderr


def test_forget_by_text_drops_the_slots_that_hold_it(tiny_dir, tok):
    succeeded(chat(tiny_dir, f'{FIRST}\n/forget " lighthouse"\n', "-n", "3", *GREEDY))
    assert "lighthouse" not in tok.decode(tokens(saved()))


def test_a_pinned_slot_is_forgotten_only_when_asked_for(tiny_dir, tok):
    script = f"{FIRST}\n/pin 0-1\n/forget 0-2\n/forget 0-2 --pinned\n"
    result = succeeded(chat(tiny_dir, script, "-n", "3", *GREEDY))
    assert len(errors(result)) == 1 and "pinned" in errors(result)[0], result.stderr
    assert saved()["fill"] == len(tok.encode(FIRST).ids) + 3 - 3


def test_pins_are_saved_and_survive_evictions(tiny_dir):
    script = f"{FIRST}\n/pin 2-3\n" + " and on\n" * 6
    succeeded(chat(tiny_dir, script, "--capacity", "24", "--evict", "6", "-n", "8", *GREEDY))
    snap = saved()
    pinned = [s for s in snap["slots"] if s["pinned"]]
    assert len(pinned) == 2 and snap["counters"]["evictions"] > 0


def test_insert_reads_text_before_a_slot(tiny_dir, tok):
    succeeded(chat(tiny_dir, f'{FIRST}\n/insert 1 " old"\n', "-n", "2", *GREEDY))
    assert tok.decode(tokens(saved())).startswith("The old lighthouse")


def test_undo_goes_back_one_turn_at_a_time(tiny_dir, tok):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n and then\n/undo\n/save one\n/undo\n/undo\n", "-n", "3", *GREEDY))
    assert tokens(saved("one")) == tok.encode(FIRST).ids + tokens(saved("one"))[-3:] and saved("one")["fill"] == len(tok.encode(FIRST).ids) + 3
    assert saved()["fill"] == 0
    assert errors(result) == ["wmgen: error: nothing to undo"]


def test_load_goes_on_from_another_session(tiny_dir):
    succeeded(chat(tiny_dir, f"{FIRST}\n", "-s", "other", "-n", "3", *GREEDY))
    other = tokens(saved("other"))
    result = succeeded(chat(tiny_dir, "Hello\n/load other\n more\n", "-n", "3", *GREEDY))
    assert "loaded session 'other'" in result.stderr
    assert tokens(saved("other"))[: len(other)] == other and len(tokens(saved("other"))) > len(other)


def test_set_changes_the_next_turn(tiny_dir):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n/set max_new_tokens 2\n more\n/set\n", "-n", "5", *GREEDY))
    origins = [s["origin"] for s in saved()["slots"]]
    assert origins.count("generated") == 7
    assert "max_new_tokens 2" in result.stdout


def test_set_policy_switches_what_the_memory_forgets(tiny_dir):
    script = f"{FIRST}\n/set policy lru\n/set policy boundary\n and then\n"
    result = succeeded(chat(tiny_dir, script, "--capacity", "16", "--evict", "4", "-n", "12", *GREEDY))
    assert len(errors(result)) == 1 and "lru" in errors(result)[0], result.stderr
    assert "by policy boundary" in result.stderr.splitlines()[-1], result.stderr
    assert saved()["policy"] == "boundary"


def test_show_text_stats_and_help_answer_on_stdout(tiny_dir):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n/show --tail 3\n/text\n/stats\n/help\n", "-n", "2", *GREEDY))
    out = result.stdout
    assert "session      last" in out and "(3 of" in out
    assert FIRST in out
    assert "counters" in out and "/forget" in out
    assert "\x1b[" not in out, "colour codes in piped output"


def test_attention_shows_a_share_per_slot(tiny_dir):
    result = succeeded(chat(tiny_dir, f"{FIRST}\n/attention --tail 4\n", "-n", "2", *GREEDY))
    assert "attention (all layers)" in result.stdout and "%" in result.stdout


def test_a_template_wraps_turns_in_labels(tiny_dir, tok):
    succeeded(chat(tiny_dir, "hello there\n", "--template", "chat", "-n", "3", *GREEDY))
    assert tok.decode(tokens(saved())).startswith("User: hello there\nBot:")


def test_an_unknown_template_is_a_usage_error(tiny_dir):
    result = chat(tiny_dir, "", "--template", "nope")
    assert result.returncode == 2 and "chat, qa" in result.stderr


def test_the_reverse_prompt_is_cut_from_memory_and_the_next_turn_follows_the_reply(tiny_dir, one_torch_thread):
    """The model's turn stopped where it began "\\nUser:": those tokens leave the
    memory, the text shown before them stays, and the next turn reads "\\nUser: ..."."""
    import wmgen
    from wmgen import chat as repl

    lm = wmgen.load(str(tiny_dir), device="cpu", dtype="float32")
    memory = lm.memory(64, 0)
    template = repl.template_for("chat", None, None)
    state = repl.Chat(lm=lm, memory=memory, session="t", state=home(), save=lambda *a, **k: {}, warn=print,
                      signals=None, console=None, template=template)
    reply = lm.encode(" Hello\nUser: more")
    memory.feed(lm.encode("User: hi\nBot:") + reply)
    repl.cut_reverse_prompt(state, reply, " Hello")
    assert lm.decode(memory.tokens) + state.leftover == "User: hi\nBot: Hello"


# --- a real terminal ----------------------------------------------------------------


def spawn(model: Path, *args: str):
    pexpect = pytest.importorskip("pexpect")
    env = environ() | {"TERM": "xterm", "COLUMNS": "120", "INPUTRC": "/dev/null"}
    argv = ["-m", "wmgen", "chat", "--model", str(model), *args]
    child = pexpect.spawn(sys.executable, argv, env=env, timeout=TIMEOUT, encoding="utf-8", dimensions=(40, 120))
    child.expect_exact("> ")
    return child


def test_on_a_terminal_a_turn_streams_and_ctrl_d_saves_and_exits_0(tiny_dir):
    child = spawn(tiny_dir, "-n", "5", *GREEDY)
    assert "/help" in child.before, "the greeting names /help"
    child.sendline(FIRST)
    child.expect_exact("> ")
    child.sendcontrol("d")
    child.expect_exact("saved")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    assert [s["origin"] for s in saved()["slots"]].count("generated") == 5


def test_on_a_terminal_ctrl_c_stops_the_turn_not_the_chat(tiny_dir):
    child = spawn(tiny_dir, "-n", "1000000", "--capacity", "32", *GREEDY)
    child.sendline(FIRST)
    child.expect_exact(FIRST + "\r\n")  # the terminal's echo
    child.expect("(?s).{60}")  # it streams
    child.sendintr()
    child.expect_exact("stopped: the ")
    child.expect_exact("> ")
    child.sendline("/stats")
    child.expect_exact("counters")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    assert any(s["origin"] == "generated" for s in saved()["slots"]), "the tokens of the stopped turn were not kept"


def test_on_a_terminal_ctrl_c_at_the_prompt_clears_the_line(tiny_dir):
    child = spawn(tiny_dir, "-n", "2", *GREEDY)
    child.send("half a line")
    child.expect_exact("half a line")  # read by readline (a ^C inside its handling of a key is seen only at the next key)
    child.sendintr()
    child.expect_exact("> ")
    child.sendline("/text")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    assert not (home() / "sessions" / "last.json").exists(), "the cleared line was read"


def test_on_a_terminal_tab_completes_commands_and_the_history_is_written(tiny_dir):
    succeeded(chat(tiny_dir, "Hi\n", "-s", "saved-one", "-n", "2", *GREEDY))
    child = spawn(tiny_dir, "-n", "2", *GREEDY)
    child.send("/fo\t\t")
    child.expect_exact("/forget")
    child.expect_exact("/fork")
    child.sendcontrol("u")  # readline: clear the line
    child.send("/lo\t")
    child.expect_exact("/load ")
    child.send("sav\t")
    child.expect_exact("saved-one")
    child.sendline("")
    child.expect_exact("loaded session 'saved-one'")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    history = (home() / "chat_history").read_text()
    assert "/load saved-one" in history
