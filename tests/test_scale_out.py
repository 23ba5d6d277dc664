"""Many prompts across hosts: GNU parallel over `wmgen generate --each-line --format jsonl`.

`parallel --pipe --keep-order` cuts stdin into chunks, runs one wmgen per chunk (on the
hosts of `-S`; here on two local job slots, `-S 2/:`, which run without ssh) and prints
the jobs' outputs in input order. Every line runs with the same `--seed` whatever chunk
and batch it lands in, so the joined records equal one process's, record for record.
Only `line` differs: each job numbers the lines of its own chunk from 1.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from test_pipeline import command, json_lines, run_process


def gnu_parallel() -> str | None:
    """Why the tests cannot run, or None: `parallel` must be GNU's (moreutils ships another)."""
    if shutil.which("parallel") is None:
        return "GNU parallel is not on PATH (apt-get install parallel)"
    try:
        version = subprocess.run(["parallel", "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"`parallel --version` failed: {e}"
    if not version.startswith("GNU parallel"):
        return "the `parallel` on PATH is not GNU parallel (moreutils' takes other options)"
    return None


MISSING = gnu_parallel()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# eight prompts of different lengths, no blank lines (a chunk of only blank lines is an
# error for its job: --each-line found no prompts); -N 3 cuts them into chunks of 3, 3, 2
PROMPTS = [
    "The lighthouse keeper",
    "Once upon a time there was a small town by the sea",
    "def fib(n):",
    "In short:",
    "灯台守は毎晩階段を上った。",
    "Title ideas: a list of",
    "Emoji too: 🌊🚢",
    "Hello world, again and again and again",
]
CHUNK = 3
SAME = ("prompt", "text", "tokens", "reason", "seed", "prompt_tokens", "unread")


@pytest.fixture
def parallel_env(tmp_path, monkeypatch):
    """parallel's own state in a temp folder, no options from $PARALLEL, and one torch
    thread per wmgen (two jobs share this machine's cores)."""
    monkeypatch.setenv("PARALLEL_HOME", str(tmp_path / "parallel-home"))
    monkeypatch.delenv("PARALLEL", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize(
    "sampling",
    [("-t", "0"), ("-t", "1.0", "--top-k", "50")],
    ids=["greedy", "sampled"],
)
def test_parallel_pipe_keep_order_joins_to_one_process_output(tiny_dir, parallel_env, sampling):
    args = ("--each-line", "--format", "jsonl", "--seed", "11", "-n", "12", "--ignore-eos", "--no-save", *sampling)
    stdin = ("\n".join(PROMPTS) + "\n").encode()

    one = run_process(command(tiny_dir, *args), input=stdin)
    assert one.returncode == 0, one.stderr.decode()
    assert one.stderr == b""
    alone = json_lines(one.stdout.decode("utf-8"))

    wmgen = shlex.join(command(tiny_dir, *args))  # one argument: parallel runs it through the shell
    spread = run_process(["parallel", "--will-cite", "--pipe", "--keep-order", "-N", str(CHUNK), "-S", "2/:", wmgen],
                         input=stdin, timeout=300)
    assert spread.returncode == 0, f"parallel exit {spread.returncode} (failed jobs): {spread.stderr.decode()}"
    assert spread.stderr == b"", spread.stderr.decode()
    joined = json_lines(spread.stdout.decode("utf-8"))

    assert [r["prompt"] for r in alone] == PROMPTS
    assert [r["prompt"] for r in joined] == PROMPTS, "--keep-order: the jobs' outputs come in input order"
    for a, j in zip(alone, joined):
        assert a["type"] == j["type"] == "result"
        for key in SAME:
            assert j[key] == a[key], f"{key} of {a['prompt']!r}: across jobs {j[key]!r}, in one process {a[key]!r}"
        assert j["seed"] == 11, "each line runs with --seed itself, whichever chunk it is in"
        # a different batch (3 rows, not 8) may round the log-probabilities differently
        # (~2e-6 measured); the tokens above are equal exactly
        assert j["logprobs"] == pytest.approx(a["logprobs"], abs=1e-4)
        assert j["stats"]["generated"] == a["stats"]["generated"] == 12

    # `line` is the line within the chunk a job read: 1, 2, 3, 1, 2, 3, 1, 2 (which also
    # shows the input was cut). With no blank lines in the input, a record's position in
    # the joined output is its line in the whole input, as one process numbers it.
    assert [r["line"] for r in alone] == list(range(1, len(PROMPTS) + 1))
    assert [r["line"] for r in joined] == [i % CHUNK + 1 for i in range(len(PROMPTS))], "the input was not cut into chunks of 3"
