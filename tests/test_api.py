"""wmgen as a Python library: the README's "In Python" code runs as written, the
library and the command line give the same tokens and read each other's sessions,
bad arguments raise the documented exceptions, and an interrupted stream leaves a
consistent memory.

The command line is the reference here because tests/test_cli.py and
tests/test_equivalence.py tie it to transformers' own forward and generate()."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import needs_gpt2_tokenizer, ok
from wmgen.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "The lighthouse keeper"
runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tiny_dir, one_torch_thread):
    import wmgen

    return wmgen.load(str(tiny_dir))


def cli_json(tiny_dir, *args: str) -> dict:
    result = runner.invoke(app, ["generate", "-m", str(tiny_dir), "--format", "json", *args])
    return json.loads(ok(result))


def python_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## In Python") : text.index("## Speed")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


# --- the package -------------------------------------------------------------------


def test_import_wmgen_loads_neither_torch_nor_transformers():
    code = "import sys, wmgen; print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import wmgen imported {out.strip()}"


def test_every_public_name_is_in_all_and_resolves():
    import wmgen

    assert set(wmgen.__all__) >= {"load", "Model", "WorkingMemory", "Generation", "sessions", "UsageError", "ModelError"}
    for name in wmgen.__all__:
        assert getattr(wmgen, name) is not None, name
    assert issubclass(wmgen.UsageError, ValueError) and issubclass(wmgen.ModelError, wmgen.WmgenError)
    assert (Path(wmgen.__file__).parent / "py.typed").is_file(), "the package ships py.typed"


@needs_gpt2_tokenizer
def test_the_readme_python_blocks_run_as_written(tiny_dir, one_torch_thread, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 4, "the README's In Python section lost its examples"
    namespace: dict = {}
    for block in blocks:
        code = block.replace('wmgen.load("gpt2")', f"wmgen.load({str(tiny_dir)!r})")  # the one substitution
        assert code != block or "wmgen.load(" not in block
        exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "temperature: temperature -1.0 must be >= 0" in printed, "the README's error example prints the CLI's message"
    assert namespace["mem2"].tokens == namespace["mem"].tokens


def test_every_public_function_names_its_units(lm):
    import wmgen

    for name in ("generate", "stream", "events", "generate_many", "perplexity", "memory"):
        doc = getattr(wmgen.Model, name).__doc__ or ""
        assert doc.strip(), f"Model.{name} has no docstring"
    assert "tokens" in wmgen.Model.memory.__doc__ and "nats" in wmgen.Model.generate.__doc__
    assert "nats" in wmgen.Model.perplexity.__doc__ and "seconds" in wmgen.Model.__doc__


# --- the library and the command line agree ---------------------------------------------


@pytest.mark.parametrize("args", [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=7), dict(temperature=1.0, top_p=0.8, seed=3)])
def test_generate_gives_the_tokens_the_command_line_gives(lm, tiny_dir, args):
    ours = lm.generate(PROMPT, max_new_tokens=12, ignore_eos=True, **args)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    theirs = cli_json(tiny_dir, "-n", "12", "--ignore-eos", "--no-save", *flags, PROMPT)
    assert list(ours.tokens) == theirs["tokens"]
    assert ours.text == theirs["text"]
    assert ours.unread == theirs["unread"] and ours.prompt_tokens == theirs["prompt_tokens"]
    assert ours.logprobs == pytest.approx(theirs["logprobs"], abs=1e-5)


def test_streamed_pieces_join_to_the_generated_text(lm):
    pieces = list(lm.stream("灯台守は", max_new_tokens=15, temperature=1.0, seed=5, ignore_eos=True))
    out = lm.generate("灯台守は", max_new_tokens=15, temperature=1.0, seed=5, ignore_eos=True)
    assert "".join(pieces) == out.text
    assert out.text == lm.decode(out.tokens)


def test_a_memory_continued_in_python_equals_one_continued_with_c(lm, tiny_dir):
    import wmgen

    mem = lm.memory(capacity=24, evict=6)
    lm.generate(PROMPT, memory=mem, max_new_tokens=10, temperature=0, ignore_eos=True)
    wmgen.sessions.save(mem, "shared")
    cli = cli_json(tiny_dir, "-c", "-s", "shared", "-n", "8", "-t", "0", "--ignore-eos", " And then")
    py = lm.generate(" And then", memory=mem, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert list(py.tokens) == cli["tokens"]
    assert wmgen.sessions.load("shared", lm).tokens == mem.tokens, "the saved session holds what Python holds"


def test_a_session_made_by_the_command_line_continues_in_python(lm, tiny_dir):
    import wmgen

    ok(runner.invoke(app, ["generate", "-m", str(tiny_dir), "-s", "cli", "-n", "6", "-t", "0", "--ignore-eos", PROMPT]))
    mem = wmgen.sessions.load("cli", lm)
    py = lm.generate(" Next", memory=mem, max_new_tokens=6, temperature=0, ignore_eos=True)
    cli = cli_json(tiny_dir, "-c", "-s", "cli", "-n", "6", "-t", "0", "--ignore-eos", " Next")
    assert list(py.tokens) == cli["tokens"]


def test_generate_many_gives_each_prompt_what_it_gives_alone_with_its_own_pinned_prompt(lm):
    prompts = ["Hi", "one two three four five six seven eight nine ten eleven"]
    opts = dict(capacity=16, keep="prompt", max_new_tokens=20, temperature=0, ignore_eos=True)
    together = lm.generate_many(prompts, **opts)
    for prompt, row in zip(prompts, together):
        alone = lm.generate(prompt, **opts)
        assert row.tokens == alone.tokens, prompt
        assert row.stats.evictions == alone.stats.evictions


def test_perplexity_gives_the_numbers_the_command_line_prints(lm, tiny_dir, tmp_path):
    text = "The keeper climbed the stairs every evening. " * 12
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    ours = lm.perplexity(text, capacity=20, evict=5)
    result = runner.invoke(app, ["perplexity", str(path), "-m", str(tiny_dir), "--capacity", "20", "--evict", "5", "--json"])
    theirs = json.loads(ok(result))
    assert ours.tokens == theirs["tokens"] and ours.evictions == theirs["evictions"]
    assert ours.perplexity == pytest.approx(theirs["perplexity"], rel=1e-9)


def test_keep_prompt_pins_what_a_memory_reads_first(lm):
    mem = lm.memory(capacity=16, keep="prompt")
    ids = lm.encode(PROMPT)
    lm.generate(PROMPT, memory=mem, max_new_tokens=30, temperature=0, ignore_eos=True)
    assert mem.keep == len(ids) and mem.tokens[: len(ids)] == ids
    assert mem.counters.evictions > 0 and mem.fill <= 16


# --- bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-1), "temperature -1"),
        (dict(top_p=0), "top-p 0"),
        (dict(capacity=5000), "capacity 5000 is outside 2..64"),
        (dict(capacity=16, keep=16), "keep 16 leaves no room"),
        (dict(evict=0), "evict 0"),
    ],
)
def test_bad_values_raise_usage_error_with_the_command_lines_words(lm, kwargs, words):
    import wmgen

    with pytest.raises(wmgen.UsageError, match=re.escape(words)) as caught:
        lm.generate(PROMPT, max_new_tokens=2, **kwargs)
    assert "--" not in str(caught.value), "the library names no flag the caller never gave"


def test_the_engine_speaks_of_capacity_not_of_a_flag(lm):
    from wmgen.errors import UsageError
    from wmgen.memory import WorkingMemory

    with pytest.raises(UsageError, match=r"^capacity 5000 is outside 2\.\.64") as caught:
        WorkingMemory(lm.network, 5000)
    assert caught.value.key == "capacity"


def test_a_missing_model_raises_model_error(tmp_path):
    import wmgen

    with pytest.raises(wmgen.ModelError):
        wmgen.load(str(tmp_path / "nope"))


def test_a_bad_preset_and_an_unknown_keyword_are_refused(tiny_dir):
    import wmgen

    with pytest.raises(wmgen.UsageError, match="unknown preset"):
        wmgen.load(str(tiny_dir), config="no-such-preset")
    with pytest.raises(TypeError, match="temprature"):
        wmgen.load(str(tiny_dir), temprature=0.5)


def test_a_preset_applies_as_config_does(tiny_dir):
    import wmgen

    lm = wmgen.load(str(tiny_dir), config="precise")
    cli = runner.invoke(app, ["generate", "-m", str(tiny_dir), "--config", "precise", "--format", "json", "--no-save", "-n", "8", PROMPT])
    assert lm.settings.sampling.temperature == 0
    assert list(lm.generate(PROMPT, max_new_tokens=8).tokens) == json.loads(ok(cli))["tokens"]


# --- interrupting and threads ----------------------------------------------------------


def test_breaking_out_of_a_stream_leaves_the_tokens_read_so_far_in_memory(lm):
    mem = lm.memory(capacity=32, evict=8)
    seen = []
    for event in lm.events(PROMPT, memory=mem, max_new_tokens=40, temperature=0, ignore_eos=True):
        if type(event).__name__ == "Token":
            seen.append(event.id)
            if len(seen) == 5:
                break
    prompt = lm.encode(PROMPT)
    assert mem.tokens == prompt + seen, "the memory holds the prompt and exactly the tokens streamed"
    whole = lm.generate(PROMPT, max_new_tokens=10, temperature=0, ignore_eos=True)
    rest = lm.generate([], memory=mem, max_new_tokens=5, temperature=0, ignore_eos=True)
    assert seen + list(rest.tokens) == list(whole.tokens), "going on from the interrupted memory continues the text"


def test_keyboard_interrupt_in_the_loop_leaves_a_consistent_memory(lm):
    mem = lm.memory(capacity=16, evict=4)
    count = 0
    with pytest.raises(KeyboardInterrupt):
        for _ in lm.stream(PROMPT, memory=mem, max_new_tokens=40, temperature=0, ignore_eos=True):
            count += 1
            if count == 20:  # past evictions
                raise KeyboardInterrupt
    assert len(mem.slots) == mem.fill <= mem.capacity
    assert mem.stale <= mem.fill, "keys and values are never ahead of the slots"
    assert mem.counters.evictions > 0
    more = lm.generate(" go on", memory=mem, max_new_tokens=3, temperature=0, ignore_eos=True)
    assert len(more.tokens) == 3


def test_one_model_serves_memories_from_two_threads(lm):
    prompts = [PROMPT, "Once upon a time"]
    alone = [lm.generate(p, max_new_tokens=10, temperature=0, ignore_eos=True, capacity=16, evict=4).tokens for p in prompts]
    results: dict[int, tuple] = {}

    def run(i):
        results[i] = lm.generate(prompts[i], max_new_tokens=10, temperature=0, ignore_eos=True, capacity=16, evict=4).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[0], results[1]] == alone


def test_bad_arguments_raise_when_called_not_when_first_iterated(lm):
    import wmgen

    with pytest.raises(wmgen.UsageError, match="temperature"):
        lm.events(PROMPT, temperature=-1)
    with pytest.raises(wmgen.UsageError, match="top-p"):
        lm.stream(PROMPT, top_p=2)
    with pytest.raises(wmgen.UsageError, match="empty"):
        lm.events("")
