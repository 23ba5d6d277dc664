"""wmgen in shell pipelines: JSON Lines events, many prompts at once, signals, colour
and exit codes, driven through real processes and real pipes where the pipe, the
signal or the terminal is the point, and through CliRunner where only the result is.

References are independent of the code under test: token ids are decoded with the
checkpoint's `tokenizer.json` through `tokenizers`; a batched result is compared with
the same prompt run alone, which tests/test_cli.py ties to transformers' greedy output.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ok, one_line_error, read_terminal
from wmgen.cli import app

PROMPT = "The lighthouse keeper"
LONG_PROMPT = (
    "The lighthouse keeper climbed the stairs every evening and watched the ships go by, "
    "while the sea grew dark and the wind rose over the old stone town."
)
# prompts of different lengths (so batched rows are padded), with blank and
# whitespace-only lines between them that must be skipped without renumbering
EACH_LINE_INPUT = "The lighthouse keeper\n\nOnce upon a time\n   \nIn short:\nHello world, again and again\n"
EACH_LINE_PROMPTS = [(1, "The lighthouse keeper"), (3, "Once upon a time"), (5, "In short:"), (6, "Hello world, again and again")]
FIVE_LINES = ["The lighthouse keeper", "Once", LONG_PROMPT, "In short:", "Title ideas: a list of"]
EVICTING = ("--capacity", "16", "--evict", "4", "--ignore-eos")
ESC = "\x1b"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # colour and text attributes

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers ---------------------------------------------------------------------


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def generate(tiny_dir: Path, *args: str, input: str | None = None):
    """`wmgen generate --model TINY ...` in process."""
    return runner.invoke(app, ["generate", "--model", str(tiny_dir), *args], input=input)


_alone: dict[tuple, dict] = {}


def alone(tiny_dir: Path, prompt: str, *args: str) -> dict:
    """The `--format json` record of `prompt` run on its own (in process, remembered)."""
    key = (str(tiny_dir), prompt, args)
    if key not in _alone:
        result = generate(tiny_dir, "--format", "json", "--no-save", *args, prompt)
        _alone[key] = json.loads(ok(result))
    return _alone[key]


def command(tiny_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "wmgen", "generate", "--model", str(tiny_dir), *args]


def environ(**extra: str) -> dict:
    """The test's environment (WMGEN_HOME is this test's folder), without colour settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    return env | extra


def run_process(args: list[str], *, input: bytes | None = None, stdin=None, timeout: float = 120):
    return subprocess.run(args, input=input, stdin=stdin, capture_output=True, timeout=timeout, env=environ())


def session_file(name: str = "last") -> Path:
    return Path(os.environ["WMGEN_HOME"]) / "sessions" / f"{name}.json"


def json_lines(text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise AssertionError(f"stdout line {number} is not JSON ({e}): {line!r}") from None
    return records


def one_line_stderr(stderr: bytes) -> str:
    text = stderr.decode("utf-8", errors="replace")
    assert "Traceback" not in text, f"a traceback on stderr:\n{text}"
    lines = text.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{text}"
    return lines[0]


# --- 1. --format jsonl and --format json --------------------------------------------------


@pytest.fixture(scope="module")
def jsonl_and_json(tiny_dir, tmp_path_factory) -> tuple[list[dict], dict]:
    """The same seeded, evicting run as `--format jsonl` and as `--format json`, each in
    a real process writing to a real pipe."""
    args = ("-n", "40", "--seed", "5", *EVICTING, PROMPT)
    env = environ(WMGEN_HOME=str(tmp_path_factory.mktemp("home")))
    out = {}
    for fmt in ("jsonl", "json"):
        result = subprocess.run(command(tiny_dir, "--format", fmt, *args), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b"", f"--format {fmt} wrote to stderr: {result.stderr!r}"
        out[fmt] = result.stdout.decode("utf-8")
    return json_lines(out["jsonl"]), json.loads(out["json"])


def test_jsonl_is_one_json_object_per_line_start_tokens_end(jsonl_and_json):
    events, _ = jsonl_and_json
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    assert set(kinds[1:-1]) == {"token", "eviction"}, f"between start and end only token and eviction events: {set(kinds)}"


def test_jsonl_start_event_names_model_settings_prompt_tokens_and_seed(jsonl_and_json, tiny_dir, tok):
    start = jsonl_and_json[0][0]
    assert start["model"] == str(tiny_dir.resolve())
    assert start["prompt_tokens"] == len(encode(tok, PROMPT))
    assert start["seed"] == 5
    assert start["settings"]["memory"] == {"capacity": 16, "keep": 0, "evict": 4, "policy": "oldest", "recent": None}
    assert start["settings"]["run"]["max_new_tokens"] == 40
    assert start["settings"]["sampling"]["seed"] == 5


def test_jsonl_token_events_follow_the_memory_and_mark_the_steps_that_evicted(jsonl_and_json, tok):
    events, _ = jsonl_and_json
    tokens = [e for e in events if e["type"] == "token"]
    assert [t["index"] for t in tokens] == list(range(40))
    # the documented rule: a token arriving at a full memory first evicts the oldest `evict`
    fill, expected_fills, expected_evicted = len(encode(tok, PROMPT)), [], []
    for _ in range(40):
        evicted = 4 if fill == 16 else 0
        fill += 1 - evicted
        expected_fills.append(fill)
        expected_evicted.append(evicted)
    assert [t["fill"] for t in tokens] == expected_fills
    assert [t.get("evicted", 0) for t in tokens] == expected_evicted
    for t in tokens:
        keys = {"type", "index", "id", "text", "logprob", "fill"} | ({"evicted"} if t.get("evicted") else set())
        assert set(t) == keys, f"token event keys {sorted(t)}; 'evicted' belongs only on steps that evicted: {t}"
        assert isinstance(t["id"], int) and isinstance(t["text"], str)
        assert isinstance(t["logprob"], float) and t["logprob"] <= 0.0


def test_jsonl_eviction_events_come_just_before_the_token_that_caused_them(jsonl_and_json):
    events, _ = jsonl_and_json
    evictions = [i for i, e in enumerate(events) if e["type"] == "eviction"]
    assert evictions, "the run should have evicted (capacity 16, 40 new tokens)"
    for i in evictions:
        e, after = events[i], events[i + 1]
        assert set(e) == {"type", "evicted", "recomputed", "fill", "positions"}, e
        assert e["evicted"] == 4 and e["recomputed"] == 16 - 4, e  # keep 0: all that stays is recomputed
        assert e["positions"] == [0, 1, 2, 3], "the oldest policy drops the first four slots"
        assert after["type"] == "token" and after.get("evicted") == e["evicted"], (e, after)
    assert sum(1 for e in events if e["type"] == "token" and e.get("evicted")) == len(evictions)


def test_jsonl_end_event_has_reason_counts_timings_and_rate(jsonl_and_json):
    events, _ = jsonl_and_json
    end = events[-1]
    evictions = [e for e in events if e["type"] == "eviction"]
    tokens = [e for e in events if e["type"] == "token"]
    assert end["reason"] == "length"
    assert end["generated"] == 40
    assert end["evictions"] == len(evictions)
    assert end["evicted"] == sum(e["evicted"] for e in evictions)
    assert end["recomputed"] == sum(e["recomputed"] for e in evictions)
    assert end["fill"] == tokens[-1]["fill"] and end["capacity"] == 16
    for key in ("prefill_s", "first_token_s", "elapsed_s", "tokens_per_s"):
        assert isinstance(end[key], float) and end[key] >= 0, (key, end.get(key))
    assert end["elapsed_s"] >= end["prefill_s"]
    assert end["tokens_per_s"] > 0
    assert isinstance(end["text"], str)


def test_jsonl_text_pieces_concatenate_to_the_json_text_and_the_decoded_ids(jsonl_and_json, tok):
    events, record = jsonl_and_json
    tokens = [e for e in events if e["type"] == "token"]
    streamed = "".join(t["text"] for t in tokens) + events[-1]["text"]
    ids = [t["id"] for t in tokens]
    assert streamed == record["text"]
    assert ids == record["tokens"], "the same seed gave other tokens in --format json"
    assert streamed == decode(tok, ids)


def test_json_is_one_object_with_prompt_text_tokens_and_stats(jsonl_and_json):
    events, record = jsonl_and_json
    assert isinstance(record, dict)
    assert record["prompt"] == PROMPT
    assert len(record["tokens"]) == 40 and all(isinstance(i, int) for i in record["tokens"])
    stats = record["stats"]
    end = events[-1]
    for key in ("reason", "generated", "evictions", "evicted", "recomputed", "fill", "capacity"):
        assert stats[key] == end[key], key
    assert "tokens_per_s" in stats and "elapsed_s" in stats


# --- 2. many prompts: --each-line and --num-samples -----------------------------------------


def check_result(record: dict, tok, *, line: int | None, prompt: str, sample: int | None = None) -> None:
    assert record["type"] == "result", record
    assert record.get("line") == line, f"expected line {line}: {record}"
    assert record.get("sample") == sample, f"expected sample {sample}: {record}"
    assert record["prompt"] == prompt
    assert record["text"] == decode(tok, record["tokens"])
    assert record["stats"]["generated"] == len(record["tokens"])


def test_each_line_from_stdin_gives_one_jsonl_result_per_line_in_order_equal_to_greedy_alone(tiny_dir, tok):
    result = run_process(command(tiny_dir, "--each-line", "--format", "jsonl", "-t", "0", "-n", "12"),
                         input=EACH_LINE_INPUT.encode())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    records = json_lines(result.stdout.decode("utf-8"))
    assert [(r["line"], r["prompt"]) for r in records] == EACH_LINE_PROMPTS
    for record, (line, prompt) in zip(records, EACH_LINE_PROMPTS):
        check_result(record, tok, line=line, prompt=prompt)
        single = alone(tiny_dir, prompt, "-t", "0", "-n", "12")
        assert record["tokens"] == single["tokens"], f"line {line}: batched greedy differs from greedy alone"
        assert record["reason"] == single["stats"]["reason"]


def test_each_line_from_a_file_as_json_is_one_array_in_input_order(tiny_dir, tok, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(EACH_LINE_INPUT, encoding="utf-8")
    result = run_process(command(tiny_dir, "--each-line", "-f", str(path), "--format", "json", "-t", "0", "-n", "12"),
                         stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    assert [(r["line"], r["prompt"]) for r in records] == EACH_LINE_PROMPTS
    for record, (line, prompt) in zip(records, EACH_LINE_PROMPTS):
        check_result(record, tok, line=line, prompt=prompt)
        assert record["tokens"] == alone(tiny_dir, prompt, "-t", "0", "-n", "12")["tokens"], f"line {line}"


@pytest.mark.parametrize("separator", [None, "=== next ==="], ids=["default", "custom"])
def test_each_line_text_prints_each_continuation_then_the_separator_line(tiny_dir, separator):
    extra = () if separator is None else ("--separator", separator)
    out = ok(generate(tiny_dir, "--each-line", "-t", "0", "-n", "8", *extra, input=EACH_LINE_INPUT))
    expected = "".join(alone(tiny_dir, p, "-t", "0", "-n", "8")["text"] + "\n" + (separator or "---") + "\n"
                       for _, p in EACH_LINE_PROMPTS)
    assert out == expected


@pytest.mark.parametrize(
    "batch_size, args",
    [("2", ("-n", "12")), ("8", ("-n", "30", *EVICTING)), ("2", ("-n", "30", *EVICTING))],
    ids=["batch-size-2", "evicting", "batch-size-2-evicting"],
)
def test_batched_greedy_equals_each_prompt_alone_token_for_token(tiny_dir, tok, batch_size, args):
    out = ok(generate(tiny_dir, "--each-line", "--batch-size", batch_size, "--format", "jsonl", "-t", "0", *args,
                      input="\n".join(FIVE_LINES) + "\n"))
    records = json_lines(out)
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    for record, prompt in zip(records, FIVE_LINES):
        check_result(record, tok, line=record["line"], prompt=prompt)
        single = alone(tiny_dir, prompt, "-t", "0", *args)
        assert record["tokens"] == single["tokens"], f"line {record['line']} ({prompt[:20]!r}): batched differs from alone"
        for key in ("evictions", "evicted", "fill"):
            assert record["stats"][key] == single["stats"][key], (key, record["line"])
        assert record["unread"] == single["unread"], record["line"]
    if "--capacity" in args:
        assert any(r["stats"]["evictions"] for r in records), "the rows should have evicted"


def test_each_line_seeded_sampling_equals_each_line_alone_with_the_same_seed(tiny_dir, tok):
    lines = FIVE_LINES[:3]
    args = ("-t", "1.0", "-n", "20", "--ignore-eos", "--seed", "11")
    records = json_lines(ok(generate(tiny_dir, "--each-line", "--format", "jsonl", *args, input="\n".join(lines))))
    assert len(records) == 3
    for record, prompt in zip(records, lines):
        assert record["tokens"] == alone(tiny_dir, prompt, *args)["tokens"], f"line {record['line']}"
        assert record["seed"] == 11


def test_num_samples_gives_reproducible_samples_each_equal_to_a_run_with_seed_plus_i(tiny_dir, tok):
    args = ("--num-samples", "3", "--seed", "7", "-n", "20", "--ignore-eos", "--format", "jsonl", PROMPT)
    first = json_lines(ok(generate(tiny_dir, *args)))
    again = json_lines(ok(generate(tiny_dir, *args)))
    assert [r["tokens"] for r in first] == [r["tokens"] for r in again], "the same seed gave other samples"
    assert [r["sample"] for r in first] == [0, 1, 2]
    for i, record in enumerate(first):
        check_result(record, tok, line=None, prompt=PROMPT, sample=i)
        single = alone(tiny_dir, PROMPT, "-n", "20", "--ignore-eos", "--seed", str(7 + i))
        assert record["tokens"] == single["tokens"], f"sample {i} is not the single run with --seed {7 + i}"
    assert len({tuple(r["tokens"]) for r in first}) == 3, "three samples, three different continuations"


def test_each_line_with_num_samples_gives_every_lines_samples_in_order(tiny_dir, tok):
    lines = ["Once", "In short:"]
    args = ("-n", "10", "--ignore-eos", "--seed", "3")
    out = ok(generate(tiny_dir, "--each-line", "--num-samples", "2", "--format", "json", *args, input="\n".join(lines)))
    records = json.loads(out)
    assert [(r["line"], r["sample"]) for r in records] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in records:
        check_result(r, tok, line=r["line"], prompt=lines[r["line"] - 1], sample=r["sample"])
        single = alone(tiny_dir, r["prompt"], "-n", "10", "--ignore-eos", "--seed", str(3 + r["sample"]))
        assert r["tokens"] == single["tokens"], (r["line"], r["sample"])


# --- 3. signals ----------------------------------------------------------------------------


def spawn(args: list[str], *, input: bytes | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ(), start_new_session=True)
    if input is not None:
        proc.stdin.write(input)
        proc.stdin.close()
        proc.stdin = None  # written and closed: communicate() has nothing left to send
    return proc


def read_until(proc: subprocess.Popen, done, timeout: float = 90) -> bytes:
    """Read stdout until `done(data)` holds; the bytes read so far."""
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not done(data):
        left = deadline - time.monotonic()
        assert left > 0, f"no output on stdout after {timeout} s (exit status so far: {proc.poll()})"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"stdout closed before the signal; exit {proc.wait()}: {proc.stderr.read().decode()}"
            data += chunk
    return data


def interrupt(proc: subprocess.Popen, signum: int, first: bytes) -> tuple[bytes, bytes, int]:
    """Send `signum`; all of stdout (including `first`), stderr, exit status."""
    try:
        proc.send_signal(signum)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return first + rest, stderr, proc.returncode


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_keeps_the_text_saves_the_memory_and_exits_128_plus_signal(tiny_dir, tok, signum, code):
    proc = spawn(command(tiny_dir, "-n", "100000", "--ignore-eos", "--capacity", "32", "--seed", "1", PROMPT))
    first = read_until(proc, lambda data: len(data) >= 20)
    stdout, stderr, status = interrupt(proc, signum, first)

    assert status == code, f"exit {status}, expected {code}; stderr: {stderr.decode(errors='replace')}"
    printed = stdout.decode("utf-8")  # whole characters only, even when cut short
    assert len(stdout) >= len(first) >= 20, "the text printed before the signal was not kept"
    line = one_line_stderr(stderr)
    assert "interrupt" in line.lower(), f"the notice should say the run was interrupted: {line}"

    snap = json.loads(session_file().read_text(encoding="utf-8"))
    generated = [s for s in snap["slots"] if s["origin"] == "generated"]
    assert generated, "the saved memory holds no generated tokens"
    assert snap["fill"] == len(snap["slots"]) <= 32
    # the tail of what was printed is the text of the generated tokens still in memory
    # (a character cut by an eviction shows as U+FFFD at the start: strip those)
    tail = decode(tok, [s["token"] for s in generated]).lstrip("\ufffd")
    assert tail and printed.endswith(tail), f"printed ...{printed[-200:]!r}\nmemory's tail {tail[-200:]!r}"
    texts = "".join(s["text"] for s in generated)
    if "\ufffd" not in texts:
        assert printed.endswith(texts), "the slots' token texts are not the tail of what was printed"


def test_sigint_during_each_line_keeps_the_results_printed_so_far_and_exits_130(tiny_dir, tok):
    lines = [f"Prompt number {i}" for i in range(1, 21)]
    args = ("--each-line", "--format", "jsonl", "--batch-size", "1", "-n", "300", "--ignore-eos", "--capacity", "32", "--seed", "1")
    proc = spawn(command(tiny_dir, *args), input="\n".join(lines).encode())
    first = read_until(proc, lambda data: b"\n" in data)  # one prompt finished
    stdout, stderr, status = interrupt(proc, signal.SIGINT, first)

    assert status == 130, f"exit {status}; stderr: {stderr.decode(errors='replace')}"
    assert "interrupt" in one_line_stderr(stderr).lower()
    records = json_lines(stdout.decode("utf-8"))
    assert 1 <= len(records) < len(lines), f"{len(records)} results: the signal should have cut the run short"
    assert [r["line"] for r in records] == list(range(1, len(records) + 1))
    for r in records[:-1]:
        assert r["reason"] == "length" and len(r["tokens"]) == 300, (r["line"], r["reason"])
    assert records[-1]["reason"] in ("length", "interrupted")
    for r in records:
        check_result(r, tok, line=r["line"], prompt=lines[r["line"] - 1])


# --- 4. colour: NO_COLOR and --no-color ------------------------------------------------------


def run_on_a_terminal(args: list[str], *, stderr_to_terminal: bool = True, **env: str) -> tuple[int, str, str]:
    """Run with a pseudo-terminal as stdout (and stderr, unless told otherwise, when it
    goes to a pipe): exit status, what the terminal showed, what stderr's pipe got."""
    parent, child = pty.openpty()
    environment = {k: v for k, v in environ().items() if k not in ("TERM", "COLUMNS")}
    environment |= {"TERM": "xterm-256color", "COLUMNS": "160", **env}
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=child,
                            stderr=child if stderr_to_terminal else subprocess.PIPE, env=environment)
    os.close(child)
    try:
        shown = read_terminal(parent)
    finally:
        os.close(parent)
        _, stderr = proc.communicate(timeout=120)
    return proc.returncode, shown.decode("utf-8", errors="replace"), (stderr or b"").decode(errors="replace")


def assert_no_escapes(text: str, what: str) -> None:
    colour = SGR.search(text)
    assert not colour, f"colour codes in {what}: ...{text[max(0, colour.start() - 60) : colour.end() + 60]!r}..."
    at = text.find(ESC)
    assert at < 0, (
        f"escape codes (cursor/erase control, not colour: the loading spinner?) in {what}: "
        f"...{text[max(0, at - 60) : at + 60]!r}..."
    )


def test_on_a_terminal_generate_has_colour_without_no_color(tiny_dir):
    """The harness check: a terminal does get styling when nothing turns it off."""
    code, shown, _ = run_on_a_terminal(command(tiny_dir, "-n", "5", "--stats", "--seed", "1", PROMPT))
    assert code == 0, shown
    assert ESC in shown, "no escape codes on a terminal at all: the terminal harness is not working"


@pytest.mark.parametrize("how", ["NO_COLOR=1", "--no-color"])
def test_no_color_generate_with_stats_on_a_terminal_writes_no_escape_bytes(tiny_dir, how):
    flag, env = (("--no-color",), {}) if how == "--no-color" else ((), {"NO_COLOR": "1"})
    code, shown, _ = run_on_a_terminal(command(tiny_dir, "-n", "5", "--stats", "--seed", "1", *flag, PROMPT), **env)
    assert code == 0, shown
    assert "tokens/s" in shown, f"the --stats line is missing: {shown!r}"
    assert_no_escapes(shown, f"generate --stats with {how}, stdout and stderr on a terminal")


def test_no_color_with_stdout_on_a_terminal_and_stderr_to_a_file_writes_no_escape_bytes(tiny_dir):
    # NO_COLOR=1 wmgen generate … 2>log.txt
    code, shown, log = run_on_a_terminal(command(tiny_dir, "-n", "5", "--stats", "--seed", "1", PROMPT),
                                         stderr_to_terminal=False, NO_COLOR="1")
    assert code == 0, log
    assert "tokens/s" in log
    assert_no_escapes(shown, "stdout (a terminal) with NO_COLOR=1")
    assert_no_escapes(log, "stderr (a file) with NO_COLOR=1")


@pytest.mark.parametrize("how", ["NO_COLOR=1", "--no-color"])
def test_no_color_inspect_memory_on_a_terminal_writes_no_escape_bytes(tiny_dir, how):
    ok(generate(tiny_dir, "-n", "6", "--seed", "1", PROMPT))  # session 'last'
    flag, env = (("--no-color",), {}) if how == "--no-color" else ((), {"NO_COLOR": "1"})
    # --attention loads the model, so stderr has a loading status to show too
    args = [sys.executable, "-m", "wmgen", "inspect-memory", "--attention", *flag]
    code, shown, _ = run_on_a_terminal(args, **env)
    assert code == 0, shown
    assert "attention" in shown
    assert_no_escapes(shown, f"inspect-memory --attention with {how}, stdout and stderr on a terminal")


# --- 5. exit codes ---------------------------------------------------------------------------
# 0 and 2 from real processes are in tests/test_cli.py; 130 and 143 are above.


def test_unreadable_session_with_continue_exits_1_in_a_real_process(tiny_dir):
    path = session_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ not json", encoding="utf-8")
    result = run_process(command(tiny_dir, "-c", "-n", "3", PROMPT), stdin=subprocess.DEVNULL)
    assert result.returncode == 1, f"exit {result.returncode}; stderr: {result.stderr.decode()}"
    assert result.stdout == b""
    assert "last" in one_line_stderr(result.stderr)
    assert path.read_text(encoding="utf-8") == "{ not json", "the unreadable session was touched"


def test_help_documents_the_exit_codes():
    out = ok(runner.invoke(app, ["--help"]))
    for code in ("130", "143"):
        assert re.search(rf"\b{code}\b", out), f"--help does not mention exit status {code}:\n{out}"


# --- 6. bad input for the new options ----------------------------------------------------------

BAD_INPUTS = [
    # (id, args, stdin, words the message must contain)
    ("format-xml", ["--format", "xml", PROMPT], None, ["xml"]),
    ("num-samples-0", ["--num-samples", "0", PROMPT], None, ["--num-samples"]),
    ("batch-size-0", ["--each-line", "--batch-size", "0"], "Once\n", ["--batch-size"]),
    ("each-line-empty-stdin", ["--each-line"], "", []),
    ("each-line-blank-lines", ["--each-line"], "\n  \n\t\n\n", []),
]


@pytest.mark.parametrize("args, stdin, words", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_for_the_pipeline_options_is_one_line_and_exit_2(tiny_dir, args, stdin, words):
    line = one_line_error(generate(tiny_dir, "-n", "3", *args, input=stdin), 2)
    for word in words:
        assert word in line, f"the message does not mention {word!r}: {line}"


@pytest.mark.parametrize("content", ["", "\n\n   \n"], ids=["empty", "blank-lines"])
def test_each_line_with_a_file_of_no_prompts_is_a_usage_error(tiny_dir, tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content, encoding="utf-8")
    one_line_error(generate(tiny_dir, "--each-line", "-f", str(path), "-n", "3"), 2)


def test_each_line_without_any_stdin_is_a_usage_error_in_a_real_process(tiny_dir):
    result = run_process(command(tiny_dir, "--each-line", "-n", "3"), stdin=subprocess.DEVNULL)
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr.decode()}"
    assert result.stdout == b""
    assert "--each-line" in one_line_stderr(result.stderr)


@pytest.mark.parametrize("saved", [True, False], ids=["with-a-saved-session", "without-a-saved-session"])
def test_each_line_with_continue_is_a_usage_error(tiny_dir, saved):
    if saved:
        ok(generate(tiny_dir, "-n", "3", "--seed", "1", PROMPT))
        assert session_file().is_file()
    result = generate(tiny_dir, "--each-line", "-c", "-n", "3", input="Once\n")
    assert result.exit_code == 2, (
        f"--each-line with -c is a usage error whatever is saved, and should be refused before the session is "
        f"read; got exit {result.exit_code}: {result.stderr!r}"
    )
    line = one_line_error(result, 2)
    assert "--continue" in line, line
