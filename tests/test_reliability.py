"""Promises about the hard edges, kept through real processes: closed pipes and full
disks, closed stderr, bytes that are not UTF-8, FIFOs and endless files, session files
a user (or an attacker) changed, failed saves, stdin in loops, and the exit codes.

Every run is `python -m wmgen ...` in its own process with this test's `WMGEN_HOME`,
`HF_HUB_OFFLINE=1` and one torch thread, with a timeout so that a hang fails the test.
SIGINT/SIGTERM mid-run (130/143, memory saved) are in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT, ok
from wmgen.cli import app

TIMEOUT = 60
BOX = re.compile(r"[─━│┃┌┏┐┓└┗┘┛├┝┠┣┤┥┨┫┬┳┴┻┼╋═║╔╗╚╝╭╮╯╰]")


# --- helpers ---------------------------------------------------------------------


def home() -> Path:
    return Path(os.environ["WMGEN_HOME"])


def session_file(name: str = "last") -> Path:
    return home() / "sessions" / f"{name}.json"


def environ(**extra: str) -> dict:
    """This test's environment (its WMGEN_HOME), offline, one torch thread, no colour settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | extra


def wmgen(*args, model: Path | None = None, input: bytes | None = None, stdin=subprocess.DEVNULL, env: dict | None = None,
          timeout: float = TIMEOUT, **popen) -> subprocess.CompletedProcess:
    """`python -m wmgen ARGS` (with `--model` after the command when given), captured."""
    argv = list(args)
    if model is not None:
        argv[1:1] = ["--model", str(model)]
    if input is not None:
        stdin = None
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "wmgen", *argv], input=input, stdin=stdin, timeout=timeout,
                          env=env or environ(), **popen)


def text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def one_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The exit status is `code`, stdout is empty and stderr is one line (returned)."""
    err = text(result.stderr)
    assert result.returncode == code, f"exit {result.returncode}, expected {code}; stderr: {err!r}"
    assert "Traceback" not in err, f"a traceback instead of a one-line error:\n{err}"
    assert "internal error" not in err, f"a bug, not a message a person can act on: {err}"
    assert result.stdout in (b"", None), f"an error run wrote to stdout: {result.stdout[:200]!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}; stderr: {text(result.stderr)}"
    return text(result.stdout)


@pytest.fixture(scope="module")
def base_session(tiny_dir, tmp_path_factory) -> bytes:
    """The bytes of a session file made by a short greedy run (copied into tests that
    need a session, instead of a run of their own)."""
    env = environ(WMGEN_HOME=str(tmp_path_factory.mktemp("base-home")))
    result = wmgen("generate", "-n", "4", "-t", "0", "Once upon a time", model=tiny_dir, env=env)
    succeeded(result)
    return (Path(env["WMGEN_HOME"]) / "sessions" / "last.json").read_bytes()


def put_session(data: bytes, name: str = "last") -> Path:
    path = session_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def edited(data: bytes, change) -> bytes:
    record = json.loads(data)
    change(record)
    return json.dumps(record).encode()


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


# --- 1. closed pipes -------------------------------------------------------------------

PIPED_COMMANDS = {
    "generate": ["generate", "-n", "2000", "--ignore-eos", "--no-save", "Once"],
    "inspect-memory-json": ["inspect-memory", "--json"],
    "inspect-memory-table": ["inspect-memory"],
    "sessions": ["sessions"],
    "sessions-json": ["sessions", "--json"],
    "perplexity": ["perplexity", "-q", "TEXT_FILE"],
    "help": ["--help"],
    "version": ["--version"],
}


@pytest.mark.parametrize("reader", ["closed-before", "closes-after-1-byte"])
@pytest.mark.parametrize("name", list(PIPED_COMMANDS))
def test_a_closed_pipe_ends_every_command_quietly_with_status_0(tiny_dir, base_session, text_file, name, reader):
    put_session(base_session)
    args = [str(text_file) if a == "TEXT_FILE" else a for a in PIPED_COMMANDS[name]]
    if args[0] in ("generate", "perplexity"):
        args[1:1] = ["--model", str(tiny_dir)]
    argv = [sys.executable, "-m", "wmgen", *args]
    if reader == "closed-before":
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE,
                                    timeout=TIMEOUT, env=environ())
        finally:
            os.close(write_end)
        status, stderr = result.returncode, result.stderr
    else:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ())
        try:
            assert proc.stdout.read(1), "the command wrote nothing at all"
            proc.stdout.close()
            stderr = proc.stderr.read()
            status = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert status == 0, f"{name}: exit {status} after the reader closed stdout; stderr: {text(stderr)!r}"
    assert stderr == b"", f"{name}: a closed pipe should end quietly, but stderr has: {text(stderr)!r}"


# --- 2. a full disk ----------------------------------------------------------------------


def test_generate_to_dev_full_exits_1_with_one_line_and_still_saves_the_memory(tiny_dir):
    with open("/dev/full", "wb") as full:
        result = wmgen("generate", "-n", "3", "hi", model=tiny_dir, stdout=full)
    line = one_line(result, 1)
    assert line.startswith("wmgen: error: cannot write to standard output"), line
    assert session_file().is_file(), "the memory was not saved after the failed write"
    json.loads(session_file().read_bytes())


def test_inspect_memory_json_to_dev_full_exits_1_with_one_line(base_session):
    put_session(base_session)
    with open("/dev/full", "wb") as full:
        result = wmgen("inspect-memory", "--json", stdout=full)
    line = one_line(result, 1)
    assert line.startswith("wmgen: error: cannot write to standard output"), line


# --- 3. stderr closed ---------------------------------------------------------------------


def close_stderr():
    os.close(2)


def test_an_error_with_stderr_closed_writes_nothing_to_stdout_and_exits_2(tiny_dir):
    result = wmgen("generate", "--temperature", "-1", "hi", model=tiny_dir, stderr=None, preexec_fn=close_stderr)
    assert result.returncode == 2, f"exit {result.returncode}; stdout: {result.stdout!r}"
    assert result.stdout == b"", f"with stderr closed the error went to stdout: {result.stdout!r}"


def test_a_run_with_stderr_closed_still_prints_its_text_and_exits_0(tiny_dir):
    result = wmgen("generate", "-n", "3", "--stats", "--no-save", "-t", "0", "hi", model=tiny_dir, stderr=None,
                   preexec_fn=close_stderr)
    assert result.returncode == 0, f"exit {result.returncode}; stdout: {result.stdout!r}"
    assert result.stdout, "no text on stdout"
    assert b"tokens/s" not in result.stdout, "the --stats line went to stdout"


# --- 4. text that is not UTF-8 ------------------------------------------------------------


@pytest.mark.parametrize("source", ["argument", "stop", "separator", "stdin", "file", "config"])
def test_text_that_is_not_utf8_from_any_source_is_one_line_and_exit_2(tiny_dir, tmp_path, source):
    bad = b"caf\xe9"
    args: list = ["generate", "--model", str(tiny_dir), "-n", "2", "--no-save"]
    stdin = None
    if source == "argument":
        args.append(bad)
    elif source == "stop":
        args += [b"--stop", b"\xff", "hi"]
    elif source == "separator":
        args += [b"--separator", b"=\xff=", "hi"]
    elif source == "stdin":
        stdin = bad + b"\n"
    elif source == "file":
        path = tmp_path / "prompt.txt"
        path.write_bytes(bad)
        args += ["-f", str(path)]
    else:
        path = tmp_path / "x.toml"
        path.write_bytes(b'[run]\nstop = ["caf\xe9"]\n')
        args += ["--config", str(path), "hi"]
    result = wmgen(*args, input=stdin)
    line = one_line(result, 2)
    assert "UTF-8" in line, f"the message should say the text is not UTF-8: {line}"


# --- 5. FIFOs ----------------------------------------------------------------------------


def test_inspect_memory_of_a_fifo_session_exits_1_at_once_naming_the_path():
    fifo = session_file()
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    line = one_line(wmgen("inspect-memory"), 1)
    assert str(fifo) in line, f"the message should name {fifo}: {line}"


def test_generate_with_a_fifo_as_the_last_session_does_not_hang_and_keeps_the_fifo(tiny_dir):
    fifo = session_file()
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    result = wmgen("generate", "-n", "2", "hi", model=tiny_dir)
    out = succeeded(result)
    assert out, "no text on stdout"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO a user made was replaced"
    err = text(result.stderr)
    saved_elsewhere = session_file("last-2").is_file() and "last-2" in err
    assert saved_elsewhere or "not saved" in err, f"neither saved under another name nor warned: {err!r}"


# --- 6. endless input --------------------------------------------------------------------


@pytest.mark.parametrize("command", [["generate", "-f", "/dev/zero"], ["perplexity", "/dev/zero"]], ids=["generate-f", "perplexity"])
def test_reading_dev_zero_ends_with_a_one_line_usage_error(tiny_dir, command):
    result = wmgen(command[0], *command[1:], model=tiny_dir, timeout=120)
    line = one_line(result, 2)
    assert "/dev/zero" in line, line


# --- 7. nothing a user made is lost --------------------------------------------------------

DAMAGE = {
    "tokenizer-changed": lambda r: r.update(tokenizer="another-tokenizer"),
    "slots-removed": lambda r: r.pop("slots"),
}


@pytest.mark.parametrize("quiet", [False, True], ids=["plain", "quiet"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_generate_keeps_a_changed_last_session_byte_for_byte_and_saves_as_last_2(tiny_dir, base_session, damage, quiet):
    original = edited(base_session, DAMAGE[damage])
    path = put_session(original)
    result = wmgen("generate", "-n", "3", *(["-q"] if quiet else []), "hi", model=tiny_dir)
    assert succeeded(result)
    assert path.read_bytes() == original, "the session a user changed was overwritten"
    assert session_file("last-2").is_file(), "the new memory was not saved as last-2"
    assert json.loads(session_file("last-2").read_bytes())["fill"] > 0
    lines = text(result.stderr).splitlines()
    assert len(lines) == 1 and "last-2" in lines[0], f"expected one line naming last-2 on stderr: {lines}"


def test_sessions_lists_the_readable_ones_and_marks_an_unreadable_one(base_session):
    put_session(base_session, "last")
    put_session(base_session, "story")
    put_session(b"{ not json", "broken")
    result = wmgen("sessions")
    lines = succeeded(result).splitlines()
    names = {line.split("\t")[0]: line for line in lines}
    assert set(names) == {"last", "story", "broken"}, lines
    assert "unreadable" in names["broken"], names["broken"]
    assert "unreadable" not in names["last"] and "unreadable" not in names["story"]


# --- 8. crafted session fields --------------------------------------------------------------

CRAFTED = {
    "counters-a-list": lambda r: r.update(counters=[1]),
    "capacity-negative": lambda r: r.update(capacity=-5),
    "no-slots": lambda r: r.pop("slots"),
    "fill-huge": lambda r: r.update(fill=1_000_000_000),
}


@pytest.mark.parametrize("command", [["inspect-memory"], ["generate", "-c", "-n", "2", " more"]], ids=["inspect-memory", "generate-c"])
@pytest.mark.parametrize("craft", list(CRAFTED))
def test_a_crafted_session_field_is_one_line_naming_the_session_never_a_flag(tiny_dir, base_session, craft, command):
    put_session(edited(base_session, CRAFTED[craft]))
    model = tiny_dir if command[0] == "generate" else None
    line = one_line(wmgen(*command, model=model), 1)
    assert re.match(r"wmgen: error: session 'last' .*cannot be used: ", line), line
    flag = re.search(r"--(capacity|keep|evict|fill|counters|slots)\b", line)
    assert not flag, f"a session's field is not a flag ({flag and flag.group()}): {line}"


# --- 9. --each-line with --keep prompt ---------------------------------------------------------

KEEP_PROMPT = ("--capacity", "16", "--keep", "prompt", "-t", "0", "--seed", "5", "-n", "20", "--ignore-eos")


def test_each_line_with_keep_prompt_pins_each_lines_own_prompt(tiny_dir):
    lines = ["Hi", "one two three four five six seven eight nine ten eleven"]
    result = wmgen("generate", "--each-line", *KEEP_PROMPT, "--format", "jsonl", model=tiny_dir,
                   input=("\n".join(lines) + "\n").encode())
    records = [json.loads(line) for line in succeeded(result).splitlines()]
    assert [r["prompt"] for r in records] == lines
    for record, line in zip(records, lines):
        alone = json.loads(succeeded(wmgen("generate", *KEEP_PROMPT, "--format", "json", "--no-save", line, model=tiny_dir)))
        assert record["tokens"] == alone["tokens"], f"line {line!r}: batched with --keep prompt differs from alone"


def test_each_line_with_a_line_too_long_to_pin_is_refused_before_any_result(tiny_dir):
    lines = ["Hi", " ".join(["word"] * 20)]
    result = wmgen("generate", "--each-line", *KEEP_PROMPT, "--format", "jsonl", model=tiny_dir,
                   input=("\n".join(lines) + "\n").encode())
    one_line(result, 2)


# --- 10. -c with another shape --------------------------------------------------------------------


def test_continue_with_a_smaller_capacity_takes_the_default_evict_for_the_new_shape(tiny_dir):
    succeeded(wmgen("generate", "-n", "5", "hi", model=tiny_dir))
    assert json.loads(session_file().read_bytes())["capacity"] == 64
    succeeded(wmgen("generate", "-c", "--capacity", "20", "-n", "3", " more", model=tiny_dir))
    snap = json.loads(session_file().read_bytes())
    assert (snap["capacity"], snap["keep"], snap["evict"]) == (20, 0, 5), "evict should be a quarter of capacity - keep"


def test_continue_with_keep_prompt_is_refused(tiny_dir, base_session):
    put_session(base_session)
    line = one_line(wmgen("generate", "-c", "--keep", "prompt", "-n", "3", " more", model=tiny_dir), 2)
    assert "--keep" in line, line


# --- 11. failed saves are visible -------------------------------------------------------------------


def block_sessions_folder() -> None:
    """A regular file where the sessions folder goes: no session can be written (root
    ignores permission bits, a file in the way it cannot)."""
    home().mkdir(parents=True, exist_ok=True)
    (home() / "sessions").write_text("in the way\n")


def test_a_failed_save_is_in_the_json_and_warned_about_even_with_quiet(tiny_dir):
    block_sessions_folder()
    result = wmgen("generate", "-q", "--format", "json", "-n", "3", "hi", model=tiny_dir)
    record = json.loads(succeeded(result))
    assert record["saved"] is False and record.get("save_error"), {k: record.get(k) for k in ("saved", "session", "save_error")}
    lines = text(result.stderr).splitlines()
    assert len(lines) == 1 and "not saved" in lines[0], f"expected one warning line on stderr: {lines}"


def test_a_failed_save_is_in_the_jsonl_end_event(tiny_dir):
    block_sessions_folder()
    result = wmgen("generate", "-q", "--format", "jsonl", "-n", "3", "hi", model=tiny_dir)
    end = json.loads(succeeded(result).splitlines()[-1])
    assert end["type"] == "end"
    assert end["saved"] is False and end.get("save_error"), end
    assert "not saved" in text(result.stderr)


def test_a_good_save_is_in_the_json(tiny_dir):
    record = json.loads(succeeded(wmgen("generate", "--format", "json", "-n", "3", "hi", model=tiny_dir)))
    assert (record["saved"], record["session"]) == (True, "last")
    assert "save_error" not in record
    assert session_file().is_file()


# --- 12. stdin ------------------------------------------------------------------------------------


def test_no_stdin_does_not_wait_for_a_stdin_that_never_closes(tiny_dir, tmp_path):
    argv = [sys.executable, "-m", "wmgen", "generate", "--model", str(tiny_dir), "--no-stdin", "-n", "3", "--no-save", "hi"]
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=environ())
        try:
            status = proc.wait(timeout=TIMEOUT)  # stdin is still open
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("--no-stdin waited for stdin") from None
        finally:
            proc.stdin.close()
            proc.wait()
    assert status == 0, (tmp_path / "err").read_text()
    assert (tmp_path / "out").read_bytes(), "no text on stdout"


def test_f_dash_reads_the_prompt_from_stdin(tiny_dir):
    record = json.loads(succeeded(wmgen("generate", "-f", "-", "-n", "3", "--no-save", "--format", "json",
                                        model=tiny_dir, input=b"Once upon\n")))
    assert record["prompt"] == "Once upon"


def test_num_samples_from_scratch_with_empty_stdin_gives_every_sample(tiny_dir):
    out = succeeded(wmgen("generate", "--num-samples", "2", "--from-scratch", "-n", "3", "--format", "jsonl",
                          "--no-save", model=tiny_dir, input=b""))
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["sample"] for r in records] == [0, 1]


def test_a_shell_loop_over_lines_runs_every_iteration_with_no_stdin(tiny_dir, tmp_path):
    (tmp_path / "lines.txt").write_text("Once\nTwice\nThrice\n")
    script = (
        'while IFS= read -r line; do '
        '"$PYTHON" -m wmgen generate --model "$MODEL" --no-stdin -n 2 --no-save "$line" >/dev/null || exit 9; '
        'echo "ran $line"; done < lines.txt'
    )
    env = environ(PYTHON=sys.executable, MODEL=str(tiny_dir))
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, timeout=TIMEOUT * 2, env=env)
    assert result.returncode == 0, text(result.stderr)
    assert text(result.stdout).splitlines() == ["ran Once", "ran Twice", "ran Thrice"]


# --- 13. unknown WMGEN_* variables ------------------------------------------------------------------


def test_an_unknown_wmgen_variable_is_warned_about_once_and_the_run_goes_on(tiny_dir):
    result = wmgen("generate", "-n", "2", "--no-save", "hi", model=tiny_dir, env=environ(WMGEN_TEMPRATURE="0.5"))
    assert succeeded(result)
    lines = text(result.stderr).splitlines()
    assert len(lines) == 1, f"expected one warning line: {lines}"
    assert "WMGEN_TEMPRATURE" in lines[0] and "WMGEN_TEMPERATURE" in lines[0], lines[0]


# --- 14. perplexity --plot ---------------------------------------------------------------------------

SWEEP = ("--sweep", "capacity=16,32")


@pytest.mark.parametrize("target", ["folder", "folder-named-png", "txt"])
def test_a_bad_plot_path_is_refused_before_any_scoring(tiny_dir, text_file, tmp_path, target):
    path = {"folder": tmp_path, "folder-named-png": tmp_path / "plots.png", "txt": tmp_path / "out.txt"}[target]
    if target == "folder-named-png":
        path.mkdir()
    line = one_line(wmgen("perplexity", str(text_file), *SWEEP, "--plot", str(path), model=tiny_dir), 2)
    assert "--plot" in line, line
    assert not (tmp_path / "out.txt").exists()


def test_a_good_plot_path_gets_the_plot(tiny_dir, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "out.png"
    succeeded(wmgen("perplexity", "-q", str(text_file), *SWEEP, "--plot", str(path), model=tiny_dir))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- 15. extreme but valid sampling values ----------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--top-p", "1e-46"), ("--temperature", "1e-300")])
def test_a_tiny_but_valid_sampling_value_runs_and_produces_tokens(tiny_dir, flag, value):
    out = succeeded(wmgen("generate", flag, value, "-n", "3", "--ignore-eos", "--no-save", "--format", "json", "hi",
                          model=tiny_dir))
    assert len(json.loads(out)["tokens"]) == 3


# --- 16. wmgen sessions in a pipe ---------------------------------------------------------------------


def test_sessions_in_a_pipe_is_one_tab_separated_line_per_session_with_the_full_model_path(tiny_dir, tmp_path):
    deep = tmp_path / ("a-model-folder-with-a-long-name-" * 4) / "gpt2-tiny"
    deep.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (deep / f.name).symlink_to(f)
    for name in ("last", "story"):
        succeeded(wmgen("generate", "-n", "2", "--session", name, "hi", model=deep))
    lines = succeeded(wmgen("sessions")).splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        fields = line.split("\t")
        assert len(fields) >= 4, f"not tab-separated: {line!r}"
        assert str(deep) in fields, f"the model path is not whole: {line!r}"
        assert "…" not in line and not BOX.search(line), f"table drawing in a pipe: {line!r}"


# --- 17. exit codes -------------------------------------------------------------------------------------


def test_a_model_that_cannot_be_found_exits_1():
    line = one_line(wmgen("generate", "-n", "2", "hi", model=Path("/nonexistent")), 1)
    assert "/nonexistent" in line, line


def test_the_largest_seed_works_with_num_samples(tiny_dir):
    """Sample i uses seed S + i, which wraps at 2**63 instead of leaving the accepted range."""
    largest = str(2**63 - 1)
    out = ok(CliRunner().invoke(app, ["generate", "-m", str(tiny_dir), "--seed", largest, "--num-samples", "2", "-n", "2", "--format", "json", "hi"]))
    assert [r["seed"] for r in json.loads(out)] == [2**63 - 1, 0]


def test_an_empty_session_name_is_refused_not_taken_for_last(tiny_dir):
    result = CliRunner().invoke(app, ["generate", "-m", str(tiny_dir), "-n", "2", "--session", "", "hi"])
    assert result.exit_code == 2 and "session name" in result.stderr, result.stderr
    assert not (Path(os.environ["WMGEN_HOME"]) / "sessions" / "last.json").exists()
