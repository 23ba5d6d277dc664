"""The `wmgen` command line, driven as a user drives it: through Typer's CliRunner
(in process, fast) and through real processes where pipes and process exit matter.

References come from `transformers` and `tokenizers` directly, never from wmgen:
greedy text is what `GPT2LMHeadModel.generate(do_sample=False)` gives, or what a plain
forward pass over the rolling window gives, decoded with the checkpoint's tokenizer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ok
from reference import Reference, reference_greedy
from wmgen.cli import app

PROMPT = "The lighthouse keeper"
LONG_PROMPT = (
    "The lighthouse keeper climbed the stairs every evening and watched the ships go by, "
    "while the sea grew dark and the wind rose over the old stone town."
)

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers -------------------------------------------------------------------


def invoke(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, list(args), input=input)


def generate(tiny_dir: Path, *args: str, input: str | bytes | None = None):
    return invoke("generate", "--model", str(tiny_dir), *args, input=input)


def greedy(tiny_dir: Path, prompt: str, n: int, *extra: str) -> str:
    result = generate(tiny_dir, "-t", "0", "-n", str(n), *extra, prompt)
    out = ok(result)
    assert result.stderr == "", f"a plain run wrote to stderr: {result.stderr!r}"
    return out


def assert_one_line_error(stderr: str, stdout: str = "") -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, f"a traceback instead of a one-line error:\n{stderr}"
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert stdout == "", f"an error run wrote to stdout: {stdout!r}"
    return lines[0]


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def hf_generate_greedy(hf_model, tok, prompt: str, n: int) -> str:
    """Text of transformers' greedy continuation, up to (not including) <|endoftext|>."""
    import torch

    ids = encode(tok, prompt)
    eos = tok.token_to_id("<|endoftext|>")
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=eos,
        )
    new = out[0, len(ids) :].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return decode(tok, new)


def rolling_greedy(hf_model, prompt_ids: list[int], n: int, *, capacity: int, keep: int, evict: int) -> list[int]:
    """Greedy tokens from the reference memory, each step's logits a fresh
    transformers forward over its window."""
    import torch

    def logits_of(window):
        with torch.no_grad():
            return hf_model(torch.tensor([window])).logits[0, -1]

    return reference_greedy(Reference(capacity, keep, evict), logits_of, prompt_ids, n)


def wmgen_process(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wmgen", *args], input=input, capture_output=True, timeout=timeout, env=os.environ.copy()
    )


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it, even if it was imported before the
    autouse fixture set the variable (it reads it once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- output --------------------------------------------------------------------


def test_greedy_output_is_transformers_greedy_continuation_and_nothing_else(tiny_dir, hf_model, tok):
    out = greedy(tiny_dir, PROMPT, 20)
    assert out == hf_generate_greedy(hf_model, tok, PROMPT, 20)


def test_stats_go_to_stderr_and_leave_stdout_unchanged(tiny_dir, tok):
    plain = greedy(tiny_dir, PROMPT, 12)
    result = generate(tiny_dir, "-t", "0", "-n", "12", "--stats", PROMPT)
    assert ok(result) == plain
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"--stats should add one line on stderr: {result.stderr!r}"
    assert "tokens/s" in lines[0]
    assert re.search(rf"\b{len(encode(tok, PROMPT))}\b", lines[0]), f"stats do not give the prompt's token count: {lines[0]}"


def test_same_seed_gives_the_same_text_and_other_seeds_differ(tiny_dir):
    args = ("-t", "1.0", "-n", "30", "--ignore-eos")
    first = ok(generate(tiny_dir, *args, "--seed", "1", PROMPT))
    again = ok(generate(tiny_dir, *args, "--seed", "1", PROMPT))
    other = ok(generate(tiny_dir, *args, "--seed", "2", PROMPT))
    assert first and first == again
    assert other != first


def test_echo_prints_the_prompt_before_the_continuation(tiny_dir):
    plain = greedy(tiny_dir, PROMPT, 10)
    assert greedy(tiny_dir, PROMPT, 10, "--echo") == PROMPT + plain


def test_stop_text_ends_generation_and_is_not_printed(tiny_dir):
    full = greedy(tiny_dir, PROMPT, 30, "--ignore-eos")
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop text from {full!r}"
    out = greedy(tiny_dir, PROMPT, 30, "--ignore-eos", "--stop", stop)
    assert out == full[: full.index(stop)]


# --- prompt sources ------------------------------------------------------------


def test_prompt_is_read_from_stdin_when_there_is_no_argument(tiny_dir):
    expected = greedy(tiny_dir, PROMPT, 10)
    result = generate(tiny_dir, "-t", "0", "-n", "10", input=PROMPT)
    assert ok(result) == expected


def test_dash_argument_reads_the_prompt_from_stdin(tiny_dir):
    expected = greedy(tiny_dir, PROMPT, 10)
    result = generate(tiny_dir, "-t", "0", "-n", "10", "-", input=PROMPT)
    assert ok(result) == expected


def test_piped_stdin_and_argument_make_one_prompt_joined_by_a_newline(tiny_dir):
    piped, argument = "Once upon a time", "In short:"
    result = generate(tiny_dir, "-t", "0", "-n", "12", argument, input=piped)
    out = ok(result)
    assert out == greedy(tiny_dir, piped + "\n" + argument, 12)
    assert out != greedy(tiny_dir, argument, 12), "the piped text made no difference"


def test_prompt_is_read_from_a_file(tiny_dir, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    result = generate(tiny_dir, "-t", "0", "-n", "10", "-f", str(path))
    assert ok(result) == greedy(tiny_dir, PROMPT, 10)


def test_empty_prompt_with_from_scratch_generates_from_endoftext(tiny_dir):
    result = generate(tiny_dir, "-n", "5", "--ignore-eos", "--seed", "3", "--from-scratch", "")
    assert ok(result) != ""


# --- working memory through the CLI --------------------------------------------


def test_prompt_longer_than_capacity_keeps_the_most_recent_tokens_and_says_how_many_were_not_read(tiny_dir, hf_model, tok):
    ids = encode(tok, LONG_PROMPT)
    capacity = 16
    assert len(ids) > capacity
    result = generate(tiny_dir, "-t", "0", "-n", "1", "--ignore-eos", "--capacity", str(capacity), LONG_PROMPT)
    out = ok(result)
    unread = len(ids) - capacity
    notice = result.stderr
    assert "not read" in notice.lower() and re.search(rf"\b{unread}\b", notice), (
        f"stderr should say that {unread} prompt tokens were not read: {notice!r}"
    )
    first = rolling_greedy(hf_model, ids[-capacity:], 1, capacity=capacity, keep=0, evict=1)
    assert out == decode(tok, first)


def test_keep_prompt_pins_the_prompt_while_the_rest_slides(tiny_dir, hf_model, tok):
    ids = encode(tok, PROMPT)
    capacity, n = 12, 30
    out = greedy(tiny_dir, PROMPT, n, "--ignore-eos", "--capacity", str(capacity), "--keep", "prompt", "--evict", "1")
    expected = rolling_greedy(hf_model, ids, n, capacity=capacity, keep=len(ids), evict=1)
    assert out == decode(tok, expected)


def test_generation_far_past_capacity_follows_the_rolling_memory(tiny_dir, hf_model, tok):
    ids = encode(tok, PROMPT)
    capacity, evict, n = 16, 4, 100  # over 5x capacity
    out = greedy(tiny_dir, PROMPT, n, "--ignore-eos", "--capacity", str(capacity), "--evict", str(evict))
    assert out == decode(tok, rolling_greedy(hf_model, ids, n, capacity=capacity, keep=0, evict=evict))


def test_sampling_far_past_capacity_with_default_evict_runs_to_the_end(tiny_dir, tok):
    result = generate(tiny_dir, "--capacity", "16", "-n", "200", "--ignore-eos", "--seed", "0", PROMPT)
    out = ok(result)
    assert result.stderr == ""
    assert len(encode(tok, out)) > 3 * 16, f"far fewer tokens than asked for: {out!r}"


# --- bad input: one line on stderr, the right exit code -------------------------

BAD_INPUTS = [
    # (id, args before the prompt, exit code, words the message must contain)
    ("temperature-below-0", ["-t", "-0.5"], 2, ["temperature"]),
    ("top-p-0", ["--top-p", "0"], 2, ["top-p"]),
    ("top-p-above-1", ["--top-p", "1.5"], 2, ["top-p"]),
    ("top-k-negative", ["--top-k", "-1"], 2, ["top-k"]),
    ("max-new-tokens-negative", ["-n", "-1"], 2, ["-1"]),
    ("capacity-1", ["--capacity", "1"], 2, ["capacity"]),
    ("capacity-above-n-positions", ["--capacity", "65"], 2, ["capacity", "64"]),
    ("keep-equals-capacity", ["--capacity", "8", "--keep", "8"], 2, ["keep"]),
    ("keep-above-capacity", ["--capacity", "8", "--keep", "9"], 2, ["keep"]),
    ("evict-0", ["--evict", "0"], 2, ["evict"]),
    ("evict-above-rolling-part", ["--capacity", "8", "--keep", "2", "--evict", "7"], 2, ["evict"]),
    ("unknown-preset", ["--config", "no-such-preset"], 2, ["no-such-preset"]),
    ("unknown-device", ["--device", "tpu"], 2, ["tpu"]),
    ("unknown-dtype", ["--dtype", "int3"], 2, ["int3"]),
    ("unknown-option", ["--no-such-option"], 2, ["--no-such-option"]),
    ("non-integer-count", ["-n", "many"], 2, ["max-new-tokens", "int"]),
    ("option-without-value", ["--stop"], 2, ["--stop"]),
]


@pytest.mark.parametrize("args, code, words", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_on_stderr_with_its_exit_code(tiny_dir, args, code, words):
    # the prompt goes before the options so that an option missing its value is the last word
    result = generate(tiny_dir, PROMPT, *args)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}: {line}"
    for word in words:
        assert word.lower() in line.lower(), f"the message does not mention {word!r}: {line}"


def test_keep_prompt_as_long_as_the_capacity_is_a_usage_error(tiny_dir, tok):
    capacity = len(encode(tok, PROMPT))
    result = generate(tiny_dir, "--capacity", str(capacity), "--keep", "prompt", PROMPT)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 2, line
    assert "keep" in line


def test_malformed_toml_config_file_is_a_usage_error_naming_the_file(tiny_dir, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[sampling\ntemperature = ", encoding="utf-8")
    result = generate(tiny_dir, "--config", str(path), PROMPT)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 2, line
    assert "broken.toml" in line


def test_unknown_key_in_a_config_file_names_the_file_and_the_key(tiny_dir, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[sampling]\ntempreature = 0.5\n", encoding="utf-8")
    result = generate(tiny_dir, "--config", str(path), PROMPT)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 2, line
    assert "mine.toml" in line and "tempreature" in line


def test_stdin_that_is_not_utf8_is_a_usage_error(tiny_dir):
    result = generate(tiny_dir, "-n", "3", input=b"caf\xe9 \xff\xfe")
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 2, line
    assert "utf-8" in line.lower()


def test_empty_prompt_is_a_usage_error(tiny_dir):
    result = generate(tiny_dir, "-n", "3", "")
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 2, line
    assert "--from-scratch" in line or "prompt" in line


def test_no_prompt_at_all_is_a_usage_error(tiny_dir):
    result = generate(tiny_dir, "-n", "3")  # CliRunner's stdin is empty
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 2, line


def test_missing_model_folder_is_a_runtime_error_naming_the_path(tmp_path):
    """The README's exit-status table: a model that cannot be found is status 1."""
    missing = tmp_path / "no-such-model"
    result = invoke("generate", "--model", str(missing), PROMPT)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 1, line
    assert str(missing) in line and "folder" in line, f"the message should name the path and what it needs: {line}"


def test_relative_missing_model_folder_is_a_runtime_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("generate", "--model", "./nope", PROMPT)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 1, line
    assert "./nope" in line


def test_uncached_hub_model_offline_says_to_pass_a_local_folder(hub_offline):
    result = invoke("generate", "--model", "wmgen-tests/not-a-cached-model", PROMPT)
    line = assert_one_line_error(result.stderr, result.stdout)
    assert result.exit_code != 0
    assert "wmgen-tests/not-a-cached-model" in line
    assert "--model" in line and "folder" in line, f"the message should say how to pass a local folder: {line}"


# --- help and import cost ----------------------------------------------------------


def test_help_exits_0_and_lists_generate():
    result = invoke("--help")
    assert ok(result) and "generate" in result.stdout


def test_bare_wmgen_shows_help_without_an_error(tiny_dir):
    result = invoke()
    assert "Usage" in result.stdout and "generate" in result.stdout
    assert "error" not in result.stderr.lower(), f"plain `wmgen` should show help, not an error: {result.stderr!r}"
    assert result.exit_code in (0, 2)


def test_generate_help_exits_0_and_lists_the_memory_options():
    out = ok(invoke("generate", "--help"))
    for option in ("--capacity", "--keep", "--evict", "--temperature", "--seed"):
        assert option in out


def test_console_script_help_exits_0():
    script = Path(sys.executable).with_name("wmgen")
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable}")
    for args in ([], ["generate"]):
        result = subprocess.run([str(script), *args, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
        assert result.stderr == ""


def test_importing_the_cli_imports_neither_torch_nor_transformers():
    code = "import wmgen.cli, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# --- real processes: pipes, exit status -----------------------------------------------


def test_python_m_wmgen_generate_reads_a_piped_prompt(tiny_dir, hf_model, tok):
    result = wmgen_process("generate", "--model", str(tiny_dir), "-t", "0", "-n", "15", input=PROMPT.encode())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", f"stderr should be empty without --stats: {result.stderr!r}"
    assert result.stdout.decode("utf-8") == hf_generate_greedy(hf_model, tok, PROMPT, 15)


def test_closed_stdout_ends_the_run_quietly_with_status_0(tiny_dir):
    # like `wmgen generate ... | head -c 5`
    proc = subprocess.Popen(
        [sys.executable, "-m", "wmgen", "generate", "--model", str(tiny_dir),
         "-n", "5000", "--ignore-eos", "--capacity", "32", PROMPT],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(),
    )
    try:
        head = proc.stdout.read(5)
        proc.stdout.close()
        stderr = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(head) == 5
    assert stderr == b"", f"a closed pipe should end silently, got:\n{stderr.decode(errors='replace')}"
    assert code == 0


@pytest.mark.parametrize(
    "args, code",
    [(["-t", "-1", PROMPT], 2), ([PROMPT, "--no-such-option"], 2)],
    ids=["temperature-below-0", "unknown-option"],
)
def test_bad_input_in_a_real_process_is_one_line_without_traceback(tiny_dir, args, code):
    result = wmgen_process("generate", "--model", str(tiny_dir), *args, input=b"")
    line = assert_one_line_error(result.stderr.decode(), result.stdout.decode())
    assert result.returncode == code, f"exit {result.returncode}, expected {code}: {line}"


def test_uncached_hub_model_in_a_real_offline_process_is_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    result = wmgen_process("generate", "--model", "wmgen-tests/not-a-cached-model", PROMPT, input=b"")
    line = assert_one_line_error(result.stderr.decode(), result.stdout.decode())
    assert result.returncode != 0
    assert "--model" in line and "folder" in line, line


def test_from_scratch_needs_no_prompt_at_all(tiny_dir):
    """`wmgen generate --from-scratch` with no argument and nothing piped generates
    unconditionally (from <|endoftext|>)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wmgen", "generate", "--model", str(tiny_dir), "--from-scratch", "-n", "5", "--seed", "2"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout != ""


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"wmgen {version('wmgen')}"
