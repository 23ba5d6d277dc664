"""Every JSON and TOML file wmgen parses survives a pathological structure (nesting
deep enough to exhaust the stack, integers of thousands of digits, NaN and Infinity
where JSON has none, files too big, values that are not objects) with its documented
outcome: a bad kernel cache is measured again and replaced with a valid one; a bad
config file is status 2 and one line naming the file. Never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import build_checkpoint, one_line_error, write_tokenizer
from wmgen import files, kernels
from wmgen.cli import app
from wmgen.errors import UsageError
from wmgen.settings import kernel_cache

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the structures ------------------------------------------------------------------

BAD_JSON = {
    "deep-lists": b"[" * 500_000,
    "deep-objects": b'{"a": ' * 100_000,
    "deep-mixed": b'[{"a": ' * 50_000,
    "deep-and-closed": b"[" * 100_000 + b"]" * 100_000,
    "deep-inside-a-cache": b'{"version": 1, "kernels": {"x": ' + b"[" * 900 + b"]" * 900 + b"}}",
    "huge-integer": b'{"version": ' + b"9" * 5000 + b', "kernels": {}}',
    "nan": b'{"version": 1, "kernels": {"x": {"kernel": "addmm", "us": NaN}}}',
    "infinity": b'{"version": 1, "kernels": {}, "x": -Infinity}',
    "overflow-to-infinity": b'{"version": 1e999, "kernels": {}}',
    "huge-file": b'{"version": 1, "kernels": {}, "pad": "' + b"x" * (1 << 20) + b'"}',
    "a-string": b'"kernels"',
    "a-number": b"5",
    "null": b"null",
    "a-list": b"[]",
}

BAD_TOML = {
    "deep-arrays": "[run]\nstop = " + "[" * 100_000,
    "deep-and-closed-arrays": "[run]\nstop = " + "[" * 500 + '"x"' + "]" * 500,
    "deep-inline-tables": "[run]\nstop = " + "{a = " * 50_000,
    "deep-dotted-key": "a" + ".a" * 400_000 + " = 1\n",
    "deep-dotted-key-in-a-table": "[run]\n" + "a" + ".a" * 100 + " = 1\n",
    "quoted-dotted-key": '"a"' + '."a"' * 10_000 + " = 1\n",
    "many-dotted-keys": "".join(f"k{i}" + ".a" * 40 + " = 1\n" for i in range(2000)),
    "deep-table-header": "[" + "a." * 100_000 + "a]\n",
    "just-too-deep": "[run]\nstop = [" + "[" * 63 + '"x"' + "]" * 63 + "]\n",
    "huge-integer": "[run]\nmax_new_tokens = " + "9" * 5000 + "\n",
    "huge-file": '[run]\nstop = "' + "x" * (1 << 20) + '"\n',
}


@pytest.mark.parametrize("text", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_json_in_any_structure_is_a_value_or_a_file_problem(text):
    try:
        value = files.parse_json(text.decode())
    except files.FileProblem as e:
        assert str(e).startswith(("is not valid JSON (", "is nested more than 64 levels deep")), str(e)
        assert "\n" not in str(e) and len(str(e)) < 200
        return
    assert not isinstance(value, dict) or "pad" in value, "only what is valid JSON comes back"


@pytest.mark.parametrize("text", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_toml_in_any_structure_is_a_table_or_a_file_problem(text):
    try:
        files.parse_toml(text)
    except files.FileProblem as e:
        assert str(e).startswith(("is not valid TOML: ", "is nested more than 64 levels deep", "has more deeply dotted keys")), str(e)
        assert "\n" not in str(e) and len(str(e)) < 200
        return
    assert text.startswith("[run]\nstop = \""), "only the huge file parses (its size is the reader's to refuse)"


def test_nesting_up_to_the_limit_is_read():
    deepest = "[" * 63 + "]" * 63
    assert files.parse_json('{"a": ' + deepest + "}") == {"a": json.loads(deepest)}
    assert files.parse_toml("a = " + deepest) == {"a": json.loads(deepest)}
    assert files.parse_toml("a" + ".a" * 62 + " = 1")
    assert files.parse_toml('x = "' + "." * 5000 + '"\n# ' + "." * 5000 + "\ny = '''\n" + "." * 5000 + "'''\n")["x"] == "." * 5000


def test_json_numbers_are_strict_and_toml_floats_are_left_to_the_settings():
    assert files.parse_json('{"a": 1.5, "b": -3, "c": 1e300}') == {"a": 1.5, "b": -3, "c": 1e300}
    for text in ("[NaN]", "[Infinity]", "[-Infinity]", "[1e400]", "[" + "1" * 4301 + "]"):
        with pytest.raises(files.FileProblem, match=r"^is not valid JSON \("):
            files.parse_json(text)
    assert files.parse_toml("a = inf")["a"] == float("inf"), "a TOML float: the settings refuse it, naming the key"


# --- the kernel cache ------------------------------------------------------------------


@pytest.fixture
def measured_here(monkeypatch):
    """Measure even the tiny model, and take the machine for a quiet one, so that a
    measurement is always kept."""
    monkeypatch.setattr(kernels, "SMALL_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "threads_share", lambda: 1.0)


def assert_a_valid_cache(path: Path) -> dict:
    data = files.parse_json(path.read_text(encoding="utf-8"))  # strict: no NaN came back
    assert isinstance(data, dict) and data["version"] == kernels.VERSION, data
    assert isinstance(data["kernels"], dict) and len(data["kernels"]) >= 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["kernels.json"], "a temporary file was left behind"
    return data


@pytest.mark.parametrize("content", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_a_pathological_kernel_cache_is_measured_again_and_replaced_by_the_library(tiny_dir, measured_here, content):
    import wmgen

    cache = kernel_cache(os.environ)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    assert kernels.read_cache(cache)[1].startswith(f"ignored {cache}: ")
    lm = wmgen.load(str(tiny_dir), device="cpu", dtype="float32")
    assert lm.kernels.how == "measured" and lm.kernels.saved, lm.kernels
    assert lm.generate("hello", max_new_tokens=2, temperature=0)
    assert_a_valid_cache(cache)
    assert kernels.read_cache(cache)[1] == "", "what was written is read back"


@pytest.fixture(scope="module")
def measured_dir(tmp_path_factory) -> Path:
    """A random checkpoint just big enough to be measured (more weights than
    `kernels.SMALL_WEIGHTS`), so a real process reads the kernel cache."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("measured-gpt2")
    write_tokenizer(folder)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    n_embd = 192 if vocab > 40_000 else 864
    assert vocab * n_embd + 12 * n_embd**2 > kernels.SMALL_WEIGHTS
    build_checkpoint(folder, n_positions=32, n_layer=1, n_embd=n_embd)
    return folder


# The real command line, with measuring told the machine is quiet (other tests run
# beside it): else a busy machine keeps the defaults and, as documented, saves nothing.
QUIET_MACHINE = "import wmgen.kernels as k; k.threads_share = lambda: 1.0; from wmgen.cli import main; main()"


@pytest.mark.parametrize("name", ["deep-lists", "deep-objects", "deep-inside-a-cache", "nan"])
def test_a_pathological_kernel_cache_is_measured_again_and_replaced_by_a_wmgen_process(measured_dir, name):
    cache = kernel_cache(os.environ)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(BAD_JSON[name])
    args = ["generate", "-m", str(measured_dir), "-n", "3", "-t", "0", "--no-save", "--stats", "--debug", "hello"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", QUIET_MACHINE, *args], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert result.stdout.strip()
    line = next(x for x in result.stderr.splitlines() if x.startswith("kernels: "))
    assert "(measured now in " in line and f"saved in {cache}; ignored {cache}: " in line, line
    assert_a_valid_cache(cache)
    assert kernels.read_cache(cache)[1] == ""


# --- config files ------------------------------------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_a_pathological_config_file_is_status_2_naming_the_file(tiny_dir, tmp_path, text):
    path = write_config(tmp_path / "bad.toml", text)
    line = one_line_error(runner.invoke(app, ["generate", "--config", str(path), "-m", str(tiny_dir), "--no-save", "x"]), 2)
    assert line.startswith(f"wmgen: error: {path} "), line
    assert len(line) < 300


@pytest.mark.parametrize("text", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_a_pathological_user_config_is_status_2_naming_the_file(tiny_dir, text):
    path = write_config(Path(os.environ["WMGEN_HOME"]) / "config.toml", text)
    line = one_line_error(runner.invoke(app, ["generate", "-m", str(tiny_dir), "--no-save", "x"]), 2)
    assert line.startswith(f"wmgen: error: {path} "), line


@pytest.mark.parametrize("args", [
    ["generate", "x"], ["inspect-memory", "--prompt", "x"], ["perplexity", "-"],
])
def test_every_command_that_reads_the_user_config_refuses_a_deep_one(tiny_dir, args):
    path = write_config(Path(os.environ["WMGEN_HOME"]) / "config.toml", BAD_TOML["deep-arrays"])
    line = one_line_error(runner.invoke(app, [*args, "-m", str(tiny_dir)], input="some text"), 2)
    assert line == f"wmgen: error: {path} is nested more than 64 levels deep, more than wmgen reads"


@pytest.mark.parametrize("where", ["--config", "user config"])
def test_a_pathological_config_is_one_line_from_a_wmgen_process(tiny_dir, tmp_path, where):
    text = BAD_TOML["deep-dotted-key"] if where == "--config" else BAD_TOML["deep-arrays"]
    if where == "--config":
        path, extra = write_config(tmp_path / "bad.toml", text), ["--config", str(tmp_path / "bad.toml")]
    else:
        path, extra = write_config(Path(os.environ["WMGEN_HOME"]) / "config.toml", text), []
    result = subprocess.run([sys.executable, "-m", "wmgen", "generate", *extra, "-m", str(tiny_dir), "x"],
                            capture_output=True, text=True, timeout=120, env=os.environ.copy(), check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"wmgen: error: {path} is nested more than 64 levels deep, more than wmgen reads\n"


@pytest.mark.parametrize("name", ["deep-arrays", "deep-dotted-key", "huge-integer"])
def test_a_pathological_config_given_to_the_library_is_a_usage_error(tiny_dir, tmp_path, name):
    import wmgen

    path = write_config(tmp_path / "bad.toml", BAD_TOML[name])
    with pytest.raises(UsageError) as e:
        wmgen.load(str(tiny_dir), config=str(path))
    assert str(e.value).startswith(f"{path} ") and "\n" not in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("[sampling]\ntemperature = nan\n", "[sampling] temperature"),
    ("[sampling]\ntop_p = -inf\n", "[sampling] top_p"),
    ("[sampling]\nseed = " + "9" * 4000 + "\n", "[sampling] seed"),
])
def test_values_toml_allows_but_wmgen_does_not_name_the_file_and_key(tiny_dir, tmp_path, text, key):
    path = write_config(tmp_path / "odd.toml", text)
    line = one_line_error(runner.invoke(app, ["generate", "--config", str(path), "-m", str(tiny_dir), "x"]), 2)
    assert line.startswith(f"wmgen: error: {path} {key}: ") and len(line) < 300, line


@pytest.mark.parametrize("variable, value", [
    ("WMGEN_MAX_NEW_TOKENS", "9" * 5000), ("WMGEN_CAPACITY", "9" * 5000), ("WMGEN_SEED", "-" + "9" * 5000),
    ("WMGEN_TEMPERATURE", "nan"), ("WMGEN_TOP_P", "1e400"), ("WMGEN_KERNELS", "[" * 100_000),
])
def test_pathological_variables_are_status_2_naming_the_variable(tiny_dir, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    line = one_line_error(runner.invoke(app, ["generate", "-m", str(tiny_dir), "--no-save", "x"]), 2)
    assert line.startswith(f"wmgen: error: {variable}: ") and len(line) < 300, line
