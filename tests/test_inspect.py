"""`wmgen inspect-memory`: the views of a saved working memory and of a prompt's
footprint, plain off a terminal, no weights loaded unless --attention asks for them.

Expectations are computed independently: token ids and text with the checkpoint's
`tokenizer.json` through `tokenizers`, sizes from its `config.json`, attention with
`transformers`' eager GPT-2 (`output_attentions=True`).
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ok, one_line_error, read_terminal
from wmgen.cli import app

runner = CliRunner()

# tokens with spaces, a newline, a tab and a double space, so whitespace has to be shown
PROMPT = "Hello world\n\tand  more text"
CAPACITY, KEEP, EVICT, NEW = 16, 2, 3, 20
LONG_PROMPT = (
    "The lighthouse keeper climbed the stairs every evening and watched the ships go by, "
    "while the sea grew dark and the wind rose over the old stone town."
)
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(.*)$")
BOX_DRAWING = range(0x2500, 0x2580)


# --- helpers -------------------------------------------------------------------


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    return runner.invoke(app, list(args), input=input, env=env)


def assert_plain(text: str, why: str = "") -> None:
    at = text.find("\x1b")
    assert at < 0, f"escape codes in plain output{why}: ...{text[max(0, at - 80) : at + 80]!r}..."
    boxes = sorted({c for c in text if ord(c) in BOX_DRAWING})
    assert not boxes, f"box-drawing characters {boxes} in plain output"


def rows(out: str) -> list[tuple[int, int, int, str, str]]:
    """The slot rows of the default view: (slot, position, token id, text, rest of line)."""
    found = []
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            found.append((int(m[1]), int(m[2]), int(m[3]), m[4], m[5]))
    return found


def header(out: str, key: str) -> str:
    """The value on the header line that starts with `key`."""
    for line in out.splitlines():
        if line.strip().startswith(key):
            return line.strip()[len(key) :].strip()
    raise AssertionError(f"no {key!r} line in the header:\n{out}")


def session_file(name: str = "last") -> Path:
    return Path(os.environ["WMGEN_HOME"]) / "sessions" / f"{name}.json"


@pytest.fixture(scope="module")
def ref_tok(tiny_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def config(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    """The checkpoint in transformers with eager attention, so it can return weights."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def saved_once(tiny_dir, tmp_path_factory) -> bytes:
    """A session made by one real `wmgen generate` that evicted and pinned (once per module)."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMGEN_HOME", str(folder))
        ok(invoke(
            "generate", "-m", str(tiny_dir), "-t", "0", "--ignore-eos", "-n", str(NEW),
            "--capacity", str(CAPACITY), "--keep", str(KEEP), "--evict", str(EVICT), PROMPT,
        ))
    return (folder / "sessions" / "last.json").read_bytes()


@pytest.fixture
def record(saved_once) -> dict:
    """Session 'last' in this test's WMGEN_HOME; its contents as data."""
    path = session_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(saved_once)
    return json.loads(saved_once)


def ids_of(record: dict) -> list[int]:
    return [s["token"] for s in record["slots"]]


# --- the default view ------------------------------------------------------------------


def test_default_view_off_a_terminal_is_plain(record):
    out = ok(invoke("inspect-memory"))
    assert out.strip()
    assert_plain(out)


def test_default_view_header_shows_the_memorys_shape_and_counters(record, ref_tok, config):
    out = ok(invoke("inspect-memory"))
    # what reading the prompt and NEW tokens into this memory does, by the documented rule
    prompt_ids = ref_tok.encode(PROMPT, add_special_tokens=False).ids
    fill, evictions = min(len(prompt_ids), CAPACITY), 0  # a prompt that does not fit is cut to fit
    for _ in range(NEW):
        if fill == CAPACITY:
            fill, evictions = fill - EVICT, evictions + 1
        fill += 1
    seen = min(len(prompt_ids), CAPACITY) + NEW  # tokens read into memory
    assert evictions > 0, "the fixture should have evicted"

    assert f"{fill}/{CAPACITY}" in header(out, "fill")
    assert re.match(rf"{KEEP}\b", header(out, "pinned")), header(out, "pinned")
    assert re.match(rf"{EVICT}\b", header(out, "evict ")), header(out, "evict ")
    assert re.match(rf"{evictions}\b", header(out, "evictions")), header(out, "evictions")
    assert re.match(rf"{seen}\b", header(out, "tokens seen")), header(out, "tokens seen")
    assert str(Path(record["model"]).name) in header(out, "model")

    kv_bytes = 2 * config["n_layer"] * fill * config["n_embd"] * 4
    assert record["kv_bytes"] == kv_bytes
    m = re.search(r"([\d.]+)\s*(B|KiB|MiB|GiB)\b", header(out, "kv"))
    assert m, f"no size on the KV line: {header(out, 'kv')!r}"
    shown = float(m[1]) * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[m[2]]
    assert abs(shown - kv_bytes) <= 0.05 * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[m[2]], (
        f"KV line says {m[0]}, 2 x layers x fill x hidden x 4 = {kv_bytes} bytes"
    )


def test_default_view_has_one_row_per_slot(record, ref_tok):
    out = ok(invoke("inspect-memory"))
    shown = rows(out)
    assert [(r[0], r[1], r[2]) for r in shown] == [(i, i, t) for i, t in enumerate(ids_of(record))]
    for (_, _, _, _, rest), slot in zip(shown, record["slots"]):
        assert slot["origin"] in rest


def test_default_view_sets_the_pinned_slots_apart(record):
    shown = rows(ok(invoke("inspect-memory")))
    assert all("pinned" in r[4] for r in shown[:KEEP]), shown[:KEEP]
    assert not any("pinned" in r[4] for r in shown[KEEP:])


def test_default_view_makes_whitespace_in_tokens_visible(tiny_dir, ref_tok):
    ok(invoke("generate", "-m", str(tiny_dir), "-n", "1", "-t", "0", PROMPT))
    prompt_ids = ref_tok.encode(PROMPT, add_special_tokens=False).ids
    shown = rows(ok(invoke("inspect-memory")))
    assert [r[2] for r in shown[: len(prompt_ids)]] == prompt_ids, "a token's whitespace broke its row"
    with_whitespace = 0
    for (_, _, token, text, _) in shown[: len(prompt_ids)]:
        raw = ref_tok.decode([token], skip_special_tokens=False)
        if raw != raw.strip() or not raw.strip():
            with_whitespace += 1
            assert raw.strip() in text and len(text) >= len(raw), f"token {raw!r} is shown as {text!r}"
    assert with_whitespace >= 3, "the prompt should have tokens with spaces, a newline and a tab"


@pytest.mark.parametrize("flag", ["--head", "--tail"])
@pytest.mark.parametrize("n", [1, 5])
def test_head_and_tail_limit_the_rows(record, flag, n):
    shown = [r[0] for r in rows(ok(invoke("inspect-memory", flag, str(n))))]
    everything = list(range(record["fill"]))
    assert shown == (everything[:n] if flag == "--head" else everything[-n:])


def test_head_with_tail_is_a_usage_error(record):
    line = one_line_error(invoke("inspect-memory", "--head", "2", "--tail", "2"), 2)
    assert "--head" in line and "--tail" in line


def test_a_named_session_is_shown(record):
    session_file("story").write_text(session_file().read_text())
    session_file().unlink()
    shown = rows(ok(invoke("inspect-memory", "--session", "story")))
    assert [r[2] for r in shown] == ids_of(record)


def test_without_a_saved_session_it_says_to_run_generate_first():
    line = one_line_error(invoke("inspect-memory"), 1)
    assert "wmgen generate" in line, line


# --- colour ---------------------------------------------------------------------------------


def run_on_a_terminal(*args: str, **env: str) -> str:
    """stdout of `wmgen` run with a pseudo-terminal as stdout."""
    parent, child = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS")}
    environ |= {"TERM": "xterm-256color", "COLUMNS": "160", **env}
    proc = subprocess.Popen([sys.executable, "-m", "wmgen", *args], stdout=child, stderr=subprocess.PIPE, env=environ)
    os.close(child)
    shown = read_terminal(parent)
    os.close(parent)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    return shown.decode("utf-8", errors="replace")


def test_on_a_terminal_the_default_view_has_colour(record):
    out = run_on_a_terminal("inspect-memory")
    assert "\x1b[" in out, "no styling on a terminal: the terminal harness is not working"


@pytest.mark.parametrize("how", ["NO_COLOR=1", "--no-color"])
def test_no_color_gives_plain_output_on_a_terminal(record, how):
    if how == "--no-color":
        out = run_on_a_terminal("inspect-memory", "--no-color")
    else:
        out = run_on_a_terminal("inspect-memory", NO_COLOR="1")
    assert [r[2] for r in rows(out)] == ids_of(record)
    assert_plain(out, f" with {how} on a terminal (the slot table's header is still bold)")


@pytest.mark.parametrize("how", ["NO_COLOR=1", "--no-color"])
def test_no_color_gives_plain_output_off_a_terminal(record, how):
    result = invoke("inspect-memory", "--no-color") if how == "--no-color" else invoke("inspect-memory", env={"NO_COLOR": "1"})
    assert_plain(ok(result))


# --- --json and --text --------------------------------------------------------------------


def test_json_is_the_whole_snapshot(record):
    data = json.loads(ok(invoke("inspect-memory", "--json")))
    assert data["fill"] == len(data["slots"]) == len(record["slots"])
    assert data == record, "--json differs from the saved session"


def test_json_with_tail_keeps_the_last_slots(record):
    data = json.loads(ok(invoke("inspect-memory", "--json", "--tail", "3")))
    assert [s["token"] for s in data["slots"]] == ids_of(record)[-3:]


def test_text_prints_exactly_the_decoded_memory(record, ref_tok):
    out = ok(invoke("inspect-memory", "--text"))
    assert out == ref_tok.decode(ids_of(record), skip_special_tokens=False)


def test_json_with_text_is_a_usage_error(record):
    one_line_error(invoke("inspect-memory", "--json", "--text"), 2)


# --- a prompt's footprint -------------------------------------------------------------------


def preview_expectation(ref_tok) -> tuple[list[int], int]:
    ids = ref_tok.encode(LONG_PROMPT, add_special_tokens=False).ids
    assert len(ids) > 16, "the preview prompt must be longer than the capacity"
    return ids[:2] + ids[len(ids) - 14 :], len(ids) - 16


def test_prompt_preview_keeps_the_pinned_head_and_the_most_recent_tokens(tiny_dir, ref_tok):
    kept, unread = preview_expectation(ref_tok)
    args = ("inspect-memory", "--prompt", LONG_PROMPT, "--capacity", "16", "--keep", "2", "-m", str(tiny_dir))
    data = json.loads(ok(invoke(*args, "--json")))
    assert [s["token"] for s in data["slots"]] == kept
    assert data["fill"] == 16 and data["capacity"] == 16 and data["keep"] == 2
    assert data["unread"] == unread

    out = ok(invoke(*args))
    assert_plain(out)
    assert [r[2] for r in rows(out)] == kept
    said = [line for line in out.splitlines() if "unread" in line]
    assert said and re.search(rf"\b{unread}\b", said[0]), f"the view does not say {unread} tokens were unread:\n{out}"
    assert not session_file().exists(), "a preview saved a session"


def test_prompt_preview_reads_stdin(tiny_dir, ref_tok):
    kept, _ = preview_expectation(ref_tok)
    args = ("inspect-memory", "--prompt", "-", "--capacity", "16", "--keep", "2", "-m", str(tiny_dir), "--json")
    data = json.loads(ok(invoke(*args, input=LONG_PROMPT)))
    assert [s["token"] for s in data["slots"]] == kept


def test_capacity_without_prompt_is_a_usage_error(record):
    one_line_error(invoke("inspect-memory", "--capacity", "16"), 2)


IN_PROCESS = """
import sys
from wmgen.cli import app
code = app(sys.argv[1:], standalone_mode=False)
sys.stdout.flush()
print("TORCH_LOADED=" + str("torch" in sys.modules), "TRANSFORMERS_LOADED=" + str("transformers" in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def loaded_modules(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()[-1]


def test_inspecting_a_saved_session_loads_no_weights(record):
    assert loaded_modules("inspect-memory") == "TORCH_LOADED=False TRANSFORMERS_LOADED=False"


def test_a_prompt_preview_loads_no_weights(tiny_dir):
    args = ("inspect-memory", "--prompt", LONG_PROMPT, "--capacity", "16", "--keep", "2", "-m", str(tiny_dir))
    assert loaded_modules(*args) == "TORCH_LOADED=False TRANSFORMERS_LOADED=False"


# --- attention -----------------------------------------------------------------------------


def reference_attention(eager_model, ids: list[int]):
    """transformers' attention weights of the last query: `[layers, heads, fill]`."""
    import torch

    with torch.no_grad():
        out = eager_model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0, :, -1, :] for a in out.attentions]).double()


def test_attention_shares_are_transformers_last_query_attention_averaged(record, eager_model):
    data = json.loads(ok(invoke("inspect-memory", "--attention", "--json")))
    shares = data["attention"]["shares"]
    assert len(shares) == data["fill"] == len(record["slots"])
    assert all(s >= 0 for s in shares)
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)
    expected = reference_attention(eager_model, ids_of(record)).mean(dim=(0, 1)).tolist()
    assert shares == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_of_one_layer_is_that_layers_mean_over_heads(record, eager_model, config, layer):
    assert layer < config["n_layer"]
    data = json.loads(ok(invoke("inspect-memory", "--attention", "--layer", str(layer), "--json")))
    shares = data["attention"]["shares"]
    assert sum(shares) == pytest.approx(1.0, abs=1e-4), "one layer's shares do not sum to 1"
    expected = reference_attention(eager_model, ids_of(record))[layer].mean(dim=0).tolist()
    assert shares == pytest.approx(expected, abs=1e-5)


def test_attention_view_adds_a_column_to_the_default_view(record):
    out = ok(invoke("inspect-memory", "--attention"))
    assert_plain(out)
    assert "attention" in out
    shown = rows(out)
    assert [r[2] for r in shown] == ids_of(record)
    assert all("%" in r[4] for r in shown), "a row without its attention share"


@pytest.mark.parametrize("layer", ["2", "99", "-1"])
def test_layer_out_of_range_is_a_usage_error(record, config, layer):
    assert config["n_layer"] == 2
    line = one_line_error(invoke("inspect-memory", "--attention", "--layer", layer), 2)
    assert "--layer" in line


def test_layer_without_attention_is_a_usage_error(record):
    line = one_line_error(invoke("inspect-memory", "--layer", "0"), 2)
    assert "--attention" in line


def test_attention_with_another_tokenizer_is_refused(record):
    edited = dict(record, tokenizer="0" * 16)
    session_file("edited").write_text(json.dumps(edited))
    line = one_line_error(invoke("inspect-memory", "--session", "edited", "--attention"), 1)
    assert "tokenizer" in line
