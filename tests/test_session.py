"""Sessions: the working memory saved after `wmgen generate`, continued with `-c`,
listed and deleted with `wmgen sessions`, and never lost or silently replaced.

The CLI is driven as a user drives it (CliRunner, in process). References come from
`transformers` and `tokenizers` directly: log-probabilities are `log_softmax` of
`GPT2LMHeadModel`'s logits, greedy continuations are a plain argmax loop over its
forward pass, token ids come from the checkpoint's own `tokenizer.json`.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ok, one_line_error
from wmgen import session
from wmgen.cli import app
from wmgen.errors import SessionError

runner = CliRunner()

PROMPT = "The lighthouse keeper"
MORE = " And then the storm came"


# --- helpers -------------------------------------------------------------------


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def generate(tiny_dir: Path, *args: str):
    return invoke("generate", "--model", str(tiny_dir), *args)


def home() -> Path:
    return Path(os.environ["WMGEN_HOME"])


def session_file(name: str = "last") -> Path:
    return home() / "sessions" / f"{name}.json"


def read_session(name: str = "last") -> dict:
    path = session_file(name)
    assert path.is_file(), f"no session file at {path}; sessions folder holds {list_folder()}"
    return json.loads(path.read_text(encoding="utf-8"))


def list_folder() -> list[str]:
    folder = home() / "sessions"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def tokens_of(record: dict) -> list[int]:
    return [s["token"] for s in record["slots"]]


@pytest.fixture(scope="module")
def ref_tok(tiny_dir):
    """The checkpoint's tokenizer, loaded by `tokenizers` itself."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def encode(ref_tok, text: str) -> list[int]:
    return ref_tok.encode(text, add_special_tokens=False).ids


def hf_logprobs(hf_model, ids: list[int]):
    """`[T, V]` log-probabilities transformers gives the token after each position."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` (no EOS stop), by argmax over full forward passes."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf_model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.fixture(scope="module")
def saved_once(tiny_dir, tmp_path_factory) -> bytes:
    """The bytes of a session saved by one real `wmgen generate` (made once per module)."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMGEN_HOME", str(folder))
        ok(generate(tiny_dir, "-n", "3", "-t", "0", "--ignore-eos", PROMPT))
    return (folder / "sessions" / "last.json").read_bytes()


@pytest.fixture
def saved(saved_once) -> Path:
    """Session 'last' in this test's WMGEN_HOME, as `wmgen generate` saved it."""
    path = session_file("last")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(saved_once)
    return path


def a_snapshot(tokens: list[int], tag: str = "") -> dict:
    """A small, valid snapshot, as plain data (what `save` is given)."""
    return {
        "capacity": max(64, len(tokens)),  # a valid session holds at most `capacity` tokens
        "keep": 0,
        "evict": 16,
        "fill": len(tokens),
        "kv_bytes": 1024 * len(tokens),
        "kv_bytes_per_token": 1024,
        "counters": {"evictions": 0, "evicted": 0, "recomputed": 0, "seen": len(tokens)},
        "model": "tiny",
        "tokenizer": "f" * 16,
        "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 7},
        "text": tag,
        "slots": [
            {"slot": i, "position": i, "token": t, "origin": "prompt", "logprob": None, "pinned": False, "text": tag}
            for i, t in enumerate(tokens)
        ],
    }


# --- what a session file holds -----------------------------------------------------


def test_generate_saves_the_final_memory_as_session_last(tiny_dir, ref_tok):
    ok(generate(tiny_dir, "-n", "5", "-t", "0", "--ignore-eos", "--capacity", "32", "--keep", "2", "--evict", "4", PROMPT))
    record = read_session("last")
    prompt_ids = encode(ref_tok, PROMPT)

    assert record["schema_version"] == 2
    assert (record["capacity"], record["keep"], record["evict"]) == (32, 2, 4)
    assert [s["pinned"] for s in record["slots"]] == [True, True] + [False] * (len(record["slots"]) - 2), "--keep 2 pins the head"
    assert record["fill"] == len(record["slots"]) == len(prompt_ids) + 5
    assert tokens_of(record)[: len(prompt_ids)] == prompt_ids, "the prompt's tokens are not at the head of memory"
    for i, slot in enumerate(record["slots"]):
        assert {"position", "origin", "logprob", "token", "text"} <= slot.keys(), f"slot {i} lacks fields: {slot}"
        assert slot["position"] == i
        assert slot["text"] == ref_tok.decode([slot["token"]], skip_special_tokens=False) or "\ufffd" in slot["text"]
    assert [s["origin"] for s in record["slots"]] == ["prompt"] * len(prompt_ids) + ["generated"] * 5
    assert all(isinstance(s["logprob"], float) for s in record["slots"][len(prompt_ids) :])
    assert record["counters"]["seen"] == len(prompt_ids) + 5
    assert record["counters"]["evictions"] == 0
    assert record["model"] == str(tiny_dir.resolve()), "the model is saved as an absolute path, so -c works anywhere"
    assert isinstance(record["tokenizer"], str) and record["tokenizer"], "no tokenizer fingerprint"
    assert record["sampling"]["temperature"] == 0.0
    assert isinstance(record["sampling"]["seed"], int), "the seed used is not recorded"
    for stamp in ("saved_at", "created_at"):
        assert datetime.fromisoformat(record[stamp]).tzinfo is not None, f"{stamp} is not an aware ISO timestamp"


def test_the_recorded_seed_repeats_a_sampled_run(tiny_dir):
    first = ok(generate(tiny_dir, "-n", "8", "--ignore-eos", PROMPT))
    seed = read_session()["sampling"]["seed"]
    again = ok(generate(tiny_dir, "-n", "8", "--ignore-eos", "--seed", str(seed), PROMPT))
    assert again == first, f"--seed {seed} (recorded in the session) did not reproduce the run"
    assert read_session()["sampling"]["seed"] == seed


def test_an_explicit_seed_is_recorded(tiny_dir):
    ok(generate(tiny_dir, "-n", "3", "--seed", "1234", PROMPT))
    assert read_session()["sampling"]["seed"] == 1234


def test_created_at_survives_a_later_save_of_the_same_session(tiny_dir, saved):
    first = read_session()
    ok(generate(tiny_dir, "-n", "2", "-t", "0", "-c", MORE))
    second = read_session()
    assert second["created_at"] == first["created_at"]
    assert datetime.fromisoformat(second["saved_at"]) >= datetime.fromisoformat(second["created_at"])


def test_session_option_saves_under_that_name_only(tiny_dir):
    ok(generate(tiny_dir, "-n", "3", "--session", "story", PROMPT))
    assert session_file("story").is_file()
    assert not session_file("last").exists(), "--session story also wrote session 'last'"
    assert read_session("story")["name"] == "story"


def test_no_save_writes_no_session(tiny_dir):
    ok(generate(tiny_dir, "-n", "3", "--no-save", PROMPT))
    assert not [n for n in list_folder() if n.endswith(".json")], f"--no-save left {list_folder()}"


def test_no_save_leaves_an_existing_session_untouched(tiny_dir, saved):
    before = session_file().read_bytes()
    ok(generate(tiny_dir, "-n", "3", "--no-save", "Something else entirely"))
    assert session_file().read_bytes() == before


@pytest.mark.parametrize("sampling", [["-t", "0"], ["--seed", "5"], ["--seed", "6", "-t", "0.7", "--top-k", "5"]])
def test_generated_logprobs_are_the_models_log_softmax(tiny_dir, hf_model, ref_tok, sampling):
    ok(generate(tiny_dir, "-n", "10", "--ignore-eos", *sampling, PROMPT))
    record = read_session()
    ids = tokens_of(record)
    reference = hf_logprobs(hf_model, ids)
    generated = [i for i, s in enumerate(record["slots"]) if s["origin"] == "generated"]
    assert len(generated) == 10
    for i in generated:
        expected = float(reference[i - 1, ids[i]])
        got = record["slots"][i]["logprob"]
        assert got == pytest.approx(expected, abs=1e-4), f"slot {i}: logprob {got}, transformers says {expected}"


def test_counters_follow_the_eviction_rule(tiny_dir, ref_tok):
    capacity, keep, evict, n = 12, 2, 3, 25
    ok(generate(tiny_dir, "-n", str(n), "-t", "0", "--ignore-eos", "--capacity", str(capacity), "--keep", str(keep), "--evict", str(evict), PROMPT))
    record = read_session()
    prompt_ids = encode(ref_tok, PROMPT)
    fill, evictions = len(prompt_ids), 0  # the documented rule: a full memory drops `evict` unpinned tokens
    for _ in range(n):
        if fill == capacity:
            fill, evictions = fill - evict, evictions + 1
        fill += 1
    c = record["counters"]
    assert (record["fill"], c["evictions"]) == (fill, evictions)
    assert c["seen"] == len(prompt_ids) + n
    assert c["evicted"] == c["seen"] - fill
    assert tokens_of(record)[:keep] == prompt_ids[:keep], "the pinned head was evicted"


# --- continuing a session -------------------------------------------------------------


def test_continuing_equals_one_greedy_run_over_the_same_tokens(tiny_dir, hf_model, ref_tok):
    k1, k2 = 6, 7
    ok(generate(tiny_dir, "-t", "0", "--ignore-eos", "-n", str(k1), PROMPT))
    first = tokens_of(read_session())
    prompt_ids = encode(ref_tok, PROMPT)
    assert first[: len(prompt_ids)] == prompt_ids
    gen1 = first[len(prompt_ids) :]
    assert gen1 == hf_greedy(hf_model, prompt_ids, k1), "the first run is not transformers' greedy continuation"

    out = ok(generate(tiny_dir, "-t", "0", "--ignore-eos", "-n", str(k2), "-c", MORE))
    record = read_session()
    more_ids = encode(ref_tok, MORE)
    sequence = prompt_ids + gen1 + more_ids
    assert tokens_of(record)[: len(sequence)] == sequence, "the continued memory does not hold A + gen1 + B"
    gen2 = tokens_of(record)[len(sequence) :]
    expected = hf_greedy(hf_model, sequence, k2)
    assert gen2 == expected, f"generate -c gave {gen2}; one greedy run over the same tokens gives {expected}"
    assert out == ref_tok.decode(gen2, skip_special_tokens=False)
    assert [s["origin"] for s in record["slots"]] == (
        ["prompt"] * len(prompt_ids) + ["generated"] * k1 + ["continued"] * len(more_ids) + ["generated"] * k2
    )
    reference = hf_logprobs(hf_model, tokens_of(record))
    for i, s in enumerate(record["slots"]):
        if s["origin"] == "generated":
            assert s["logprob"] == pytest.approx(float(reference[i - 1, s["token"]]), abs=1e-4), f"slot {i}"
    assert record["counters"]["seen"] == len(sequence) + k2


def test_continue_uses_the_sessions_model_from_any_folder(tiny_dir, ref_tok, tmp_path, monkeypatch):
    ok(generate(tiny_dir, "-t", "0", "-n", "3", "--ignore-eos", PROMPT))
    before = tokens_of(read_session())
    monkeypatch.chdir(tmp_path)
    ok(invoke("generate", "-t", "0", "-n", "2", "--ignore-eos", "-c", MORE))  # no --model
    after = tokens_of(read_session())
    assert after[: len(before)] == before
    assert len(after) == len(before) + len(encode(ref_tok, MORE)) + 2


def test_continue_of_a_named_session_saves_back_to_it(tiny_dir):
    ok(generate(tiny_dir, "-n", "3", "-t", "0", "--session", "story", PROMPT))
    fill = read_session("story")["fill"]
    ok(generate(tiny_dir, "-n", "3", "-t", "0", "--ignore-eos", "--session", "story", "-c", MORE))
    assert read_session("story")["fill"] > fill
    assert not session_file("last").exists()


def test_continue_without_a_session_is_a_one_line_error(tiny_dir):
    line = one_line_error(generate(tiny_dir, "-c", MORE), 1)
    assert "generate" in line, f"the error does not say to run generate first: {line}"


def other_tokenizer_checkpoint(tiny_dir: Path, folder: Path) -> Path:
    """The same weights with a tokenizer whose vocabulary differs: two ids swapped."""
    shutil.copytree(tiny_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[300], by_id[301]
    vocab[a], vocab[b] = 301, 300
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


def test_continuing_with_another_tokenizer_is_refused(tiny_dir, saved, tmp_path):
    other = other_tokenizer_checkpoint(tiny_dir, tmp_path / "other-tokenizer")
    before = session_file().read_bytes()
    line = one_line_error(invoke("generate", "-m", str(other), "-n", "3", "-c", MORE), 1)
    assert "tokenizer" in line, f"the error does not name the cause: {line}"
    assert "--model" in line or "--session" in line, f"the error does not say what to do: {line}"
    assert session_file().read_bytes() == before, "a refused continue changed the session"


def test_a_session_whose_tokenizer_field_differs_is_refused(tiny_dir, saved):
    record = read_session()
    record["tokenizer"] = "0" * 16
    session_file("edited").write_text(json.dumps(record), encoding="utf-8")
    line = one_line_error(generate(tiny_dir, "-n", "3", "--session", "edited", "-c", MORE), 1)
    assert "tokenizer" in line and ("--model" in line or "--session" in line), line


# --- unreadable sessions --------------------------------------------------------------


def corrupt(kind: str, path: Path) -> None:
    if kind == "garbage":
        path.write_bytes(b"\x00\xff\xfe\x80 this is not a session \x9c\x00")
    elif kind == "truncated":
        text = path.read_bytes()
        path.write_bytes(text[: len(text) // 2])
    elif kind == "schema":
        record = json.loads(path.read_text(encoding="utf-8"))
        record["schema_version"] = 999
        path.write_text(json.dumps(record), encoding="utf-8")
    elif kind == "not-an-object":
        path.write_text("[1, 2, 3]", encoding="utf-8")


KINDS = ["garbage", "truncated", "schema", "not-an-object"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_session_is_reported_by_inspect_memory(saved, kind):
    corrupt(kind, session_file())
    line = one_line_error(invoke("inspect-memory"), 1)
    assert "last" in line, f"the error does not name the session: {line}"
    assert "delete" in line or "move" in line, f"the error does not say what to do: {line}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_session_is_reported_by_generate_continue_and_left_as_it_is(tiny_dir, saved, kind):
    corrupt(kind, session_file())
    before = session_file().read_bytes()
    line = one_line_error(generate(tiny_dir, "-n", "3", "-c", MORE), 1)
    assert "last" in line
    assert session_file().read_bytes() == before


@pytest.mark.parametrize("kind", ["truncated", "schema"])
def test_plain_generate_does_not_overwrite_a_corrupt_session(tiny_dir, saved, kind):
    corrupt(kind, session_file())
    before = session_file().read_bytes()
    result = generate(tiny_dir, "-n", "3", "-t", "0", "--ignore-eos", PROMPT)
    assert result.stdout, "the text should still be generated"
    assert session_file().read_bytes() == before, f"a corrupt session ({kind}) was silently replaced"
    assert "Traceback" not in result.stderr
    assert "warning" in result.stderr.lower() and "last" in result.stderr, f"no warning on stderr: {result.stderr!r}"
    assert not [n for n in list_folder() if n.endswith(".tmp")], f"a temporary file was left: {list_folder()}"


def test_sessions_lists_an_unreadable_session_instead_of_failing(saved):
    shutil.copy(saved, session_file("bad"))
    corrupt("garbage", session_file("bad"))
    out = ok(invoke("sessions"))
    assert "last" in out and "bad" in out
    rows = {r["name"]: r for r in json.loads(ok(invoke("sessions", "--json")))}
    assert rows["last"]["fill"] == read_session("last")["fill"]
    assert "error" in rows["bad"] or rows["bad"].get("fill") is None


# --- session names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/etc/passwd", ".hidden", "a\\b"])
def test_bad_session_names_are_usage_errors(tiny_dir, name):
    one_line_error(generate(tiny_dir, "-n", "2", "--session", name, PROMPT), 2)
    one_line_error(invoke("inspect-memory", "--session", name), 2)
    one_line_error(invoke("sessions", "--delete", name), 2)
    assert not (home().parent / "x.json").exists()
    assert not [n for n in list_folder() if n.endswith(".json")]


# --- atomic, locked writes -------------------------------------------------------------------


def test_a_snapshot_round_trips_through_save_and_load(tmp_path):
    snap = a_snapshot([5, 6, 7], tag="héllo ✓")
    session.write(tmp_path, "round", snap)
    loaded = session.read(tmp_path, "round")
    ours = ("schema_version", "name", "saved_at", "created_at")
    assert {k: v for k, v in loaded.items() if k not in ours} == snap | {"pinned": 0}, "read back as written, pins counted"


@pytest.mark.parametrize("where", ["json.dump", "os.replace", "os.fsync"])
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_crash_while_saving_leaves_the_old_session_intact_and_no_temp_file(tmp_path, monkeypatch, where, failure):
    session.write(tmp_path, "s", a_snapshot([1, 2, 3], tag="old"))
    path = session.path_of(tmp_path, "s")
    before = path.read_bytes()
    module_name, attr = where.split(".")
    module = {"json": json, "os": os}[module_name]
    real = getattr(module, attr)

    def crash(*args, **kwargs):
        if attr == "dump":  # half a file first, as a full disk would leave it
            args[1].write('{"schema_version": 1, "slots": [')
        raise failure

    monkeypatch.setattr(module, attr, crash)
    expected = SessionError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        session.write(tmp_path, "s", a_snapshot(list(range(200)), tag="new"))
    monkeypatch.setattr(module, attr, real)

    assert path.read_bytes() == before, f"a failure in {where} changed the saved session"
    assert session.read(tmp_path, "s")["text"] == "old"
    leftovers = sorted(p.name for p in path.parent.iterdir() if p.name not in ("s.json", "s.json.lock"))
    assert leftovers == [], f"a failure in {where} left {leftovers} behind"


def test_the_next_save_removes_what_a_killed_save_left_and_nothing_else(tmp_path):
    session.write(tmp_path, "s", a_snapshot([1, 2, 3], tag="old"))
    session.write(tmp_path, "s.v2", a_snapshot([4], tag="other"))
    folder = session.path_of(tmp_path, "s").parent
    stale = [".s.json.k1lled_1.tmp", "..s.undo.k1lled_2.tmp", ".s.k1lled_3.tmp"]  # the last as older versions named it
    others = [".s.v2.json.abcdefgh.tmp", ".s.v2.abcdefgh.tmp", ".s.json.notours.tmp", "s.json.k1lled_4.tmp", "notes.txt"]
    for name in stale + others:
        (folder / name).write_text("{half")
    session.write(tmp_path, "s", a_snapshot([7, 8], tag="new"))
    left = {p.name for p in folder.iterdir()}
    assert not left & set(stale), f"still there after the next save: {sorted(left & set(stale))}"
    assert set(others) <= left, f"removed what was not a temporary of session s: {sorted(set(others) - left)}"
    assert session.read(tmp_path, "s")["text"] == "new" and session.read(tmp_path, "s.v2")["text"] == "other"


def test_a_failed_save_during_generate_is_a_warning_and_keeps_the_old_session(tiny_dir, saved, monkeypatch):
    before = session_file().read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = os.replace
    monkeypatch.setattr(os, "replace", full_disk)
    result = generate(tiny_dir, "-n", "3", "-t", "0", "--ignore-eos", "Other words")
    monkeypatch.setattr(os, "replace", real)
    assert result.stdout, "the generated text should still be printed"
    assert "No space left" in result.stderr, f"the failure is not reported: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert session_file().read_bytes() == before
    assert not [n for n in list_folder() if n.endswith(".tmp")]


def _save_repeatedly(state: str, name: str, writer: int, times: int) -> None:
    for i in range(times):
        size = 40 + 150 * writer + (i * 37) % 300  # sizes differ, so a torn write cannot look whole
        tag = f"writer {writer} save {i}"
        session.write(Path(state), name, a_snapshot([writer * 100_000 + i] * size, tag=tag))


def _load_repeatedly(state: str, name: str, stop, results) -> None:
    loads, problems = 0, []
    while not stop.is_set() or loads == 0:
        try:
            record = session.read(Path(state), name)
            if len({s["token"] for s in record["slots"]}) != 1 or len(record["slots"]) != record["fill"]:
                problems.append(f"a mixed snapshot: {record['text']}")
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{type(e).__name__}: {e}")
        loads += 1
    results.put((loads, len(problems), problems[:3]))


def test_two_processes_saving_one_session_never_leave_an_unreadable_file(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    state, name, times = str(tmp_path), "shared", 60
    session.write(tmp_path, name, a_snapshot([0], tag="seed"))
    stop, results = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_load_repeatedly, args=(state, name, stop, results))
    writers = [ctx.Process(target=_save_repeatedly, args=(state, name, w, times)) for w in (1, 2)]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    loads, failed, examples = results.get(timeout=60)
    reader.join(60)
    assert [w.exitcode for w in writers] == [0, 0], "a writer failed"
    assert failed == 0, f"a reader saw {failed} unreadable versions in {loads} loads, e.g. {examples}"

    record = session.read(tmp_path, name)
    assert record["text"] in {f"writer {w} save {times - 1}" for w in (1, 2)}, record["text"]
    leftovers = sorted(p.name for p in tmp_path.joinpath("sessions").iterdir() if p.name.endswith(".tmp"))
    assert leftovers == []


# --- listing and deleting ------------------------------------------------------------------------


def test_sessions_lists_the_saved_sessions_by_name(tiny_dir, saved):
    ok(generate(tiny_dir, "-n", "2", "--session", "story", PROMPT))
    out = ok(invoke("sessions"))
    assert "last" in out and "story" in out
    rows = json.loads(ok(invoke("sessions", "--json")))
    assert sorted(r["name"] for r in rows) == ["last", "story"]
    story = next(r for r in rows if r["name"] == "story")
    assert story["fill"] == read_session("story")["fill"]
    assert story["model"] == str(tiny_dir.resolve())


def test_sessions_with_none_saved_says_so(tiny_dir):
    result = invoke("sessions")
    assert json.loads(ok(invoke("sessions", "--json"))) == []
    assert ok(result) == "", "piped, stdout carries one line per session and nothing else"
    assert "no saved sessions" in result.stderr, "an empty listing said nothing at all"


def test_sessions_delete_removes_one_session(saved):
    shutil.copy(saved, session_file("story"))
    ok(invoke("sessions", "--delete", "story"))
    assert not session_file("story").exists()
    assert session_file("last").is_file()
    assert [r["name"] for r in json.loads(ok(invoke("sessions", "--json")))] == ["last"]


def test_deleting_a_missing_session_is_a_one_line_error(tiny_dir):
    line = one_line_error(invoke("sessions", "--delete", "nope"), 1)
    assert "nope" in line
