"""A preview shows what `generate` would do: the same shape decision, the same
refusal in the same words, the same tokens kept; and the bytes it says a stored
key and value cost are what a run's store really holds, in int8 too."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import wmgen
from conftest import ok
from wmgen.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tiny_dir, one_torch_thread):
    return wmgen.load(str(tiny_dir), device="cpu", dtype="float32")


def outcome(call):
    """(result, None), or (None, the UsageError's message)."""
    try:
        return call(), None
    except wmgen.UsageError as e:
        return None, str(e)


def without_scores(snapshot: dict) -> dict:
    """What a preview can know: no sampling settings, no attention received yet."""
    slots = [{k: v for k, v in s.items() if k not in ("score", "queries")} for s in snapshot["slots"]]
    return {k: v for k, v in snapshot.items() if k not in ("sampling", "slots", "prompt_tokens", "unread")} | {"slots": slots}


shapes = st.fixed_dictionaries(
    {
        "capacity": st.one_of(st.none(), st.integers(2, 64)),
        "keep": st.one_of(st.none(), st.integers(0, 70), st.just("prompt")),
        "evict": st.one_of(st.none(), st.integers(1, 70)),
        "policy": st.sampled_from(["oldest", "boundary", "attention"]),
        "recent": st.one_of(st.none(), st.integers(0, 70)),
    }
)


@settings(max_examples=80, deadline=None)
@given(length=st.integers(1, 150), shape=shapes, seed=st.integers(0, 2**16))
def test_a_preview_refuses_exactly_what_generate_refuses_and_else_keeps_what_generate_keeps(lm, length, shape, seed):
    ids = [random.Random(seed).randrange(lm.info.vocab_size) for _ in range(length)]
    preview, refused = outcome(lambda: lm.preview(ids, **shape))
    run, run_refused = outcome(lambda: lm.generate(ids, max_new_tokens=0, **shape))
    assert refused == run_refused, "the preview and generate disagree about refusing"
    mem, mem_refused = outcome(lambda: read_into_a_memory(lm, ids, shape))
    # A memory made first checks its shape before it knows the prompt (keep 0), and
    # again at its first read: it refuses what generate refuses, at one time or the other.
    assert (mem_refused is None) == (refused is None), "a memory made first refuses the prompt as generate does"
    if refused:
        return
    assert (preview["fill"], preview["capacity"]) == (run.stats.fill, run.stats.capacity)
    assert (preview["prompt_tokens"], preview["unread"]) == (run.prompt_tokens, run.unread)
    assert without_scores(preview) == without_scores(mem.snapshot()), "the preview is the memory after reading the prompt"


def read_into_a_memory(lm, ids, shape):
    """A memory of `shape`, made first, after reading `ids` (and generating nothing)."""
    mem = lm.memory(**shape)
    lm.generate(ids, memory=mem, max_new_tokens=0)
    return mem


def test_a_prompt_longer_than_capacity_with_keep_prompt_is_refused_by_preview_and_generate_alike(tiny_dir, tok):
    words = " ".join(["lighthouse"] * 40)
    assert len(tok.encode(words).ids) > 32
    args = ("--capacity", "32", "--keep", "prompt", "-m", str(tiny_dir))
    preview = runner.invoke(app, ["inspect-memory", "--prompt", "-", *args], input=words)
    run = runner.invoke(app, ["generate", "-n", "1", "--no-save", *args], input=words)
    assert preview.exit_code == run.exit_code == 2, (preview.output, run.output)
    said = [r.stderr.strip().splitlines()[-1] for r in (preview, run)]
    assert said[0] == said[1] and "leaves no room to roll in capacity 32" in said[0]


def test_keep_prompt_at_the_models_limit_is_refused_by_the_preview_too(lm):
    ids = list(range(1, lm.n_positions + 10))
    _, refused = outcome(lambda: lm.preview(ids, keep="prompt"))
    _, run_refused = outcome(lambda: lm.generate(ids, keep="prompt", max_new_tokens=0))
    assert refused == run_refused and f"keep {len(ids)} leaves no room" in refused


def test_an_empty_prompt_is_refused_by_preview_and_generate_in_the_same_words(lm):
    assert outcome(lambda: lm.preview(""))[1] == outcome(lambda: lm.generate(""))[1]
    assert lm.preview("", from_scratch=True)["fill"] == 1


# --- what a stored key and value cost ------------------------------------------------------


def store_bytes_per_token(network) -> int:
    store = network.new_store(4)
    return store.nbytes // store.slots


@pytest.fixture(params=["float32", "bfloat16"], ids=["float32-store", "bfloat16-store"])
def int8_lm(request, tiny_dir, monkeypatch, one_torch_thread):
    """An int8 model as loaded on a CPU with native bfloat16 where attention over a
    float32 or a bfloat16 store measures faster (the other made slower)."""
    from wmgen import kernels
    from wmgen import model as loader
    from wmgen.formats import int8_available

    if not int8_available():
        pytest.skip("this torch has none of the int8 kernels, so --dtype int8 cannot run here")
    monkeypatch.setattr(loader, "KV_BFLOAT16", True)
    monkeypatch.setattr(kernels, "threads_share", lambda: 1.0)  # a quiet machine, whatever runs beside the tests
    real = kernels._attention
    slow = "bfloat16" if request.param == "float32" else "float32"
    monkeypatch.setattr(kernels, "_attention", lambda d, k, v: (lambda x: [real(d, k, v)(x) for _ in range(30)][-1]) if d == slow else real(d, k, v))
    loader._store_dtype.cache_clear()
    lm = wmgen.load(str(tiny_dir), device="cpu", dtype="int8")
    lm.stored = request.param
    yield lm
    loader._store_dtype.cache_clear()


def test_the_kv_dtype_is_decided_in_one_place_for_the_network_and_the_preview(int8_lm):
    from wmgen import model as loader
    from wmgen.settings import kernel_cache

    decided = loader.kv_dtype("int8", "cpu", loader.store_shape(int8_lm.info), kernel_cache(os.environ))
    assert decided == int8_lm.stored
    assert str(int8_lm.network.kv_dtype) == f"torch.{decided}"


def test_an_int8_preview_says_what_the_store_really_costs_per_token(int8_lm):
    said = int8_lm.preview("The keeper climbed the stairs", capacity=16)
    assert said["kv_bytes_per_token"] == store_bytes_per_token(int8_lm.network)
    assert said["kv_bytes"] == said["kv_bytes_per_token"] * said["fill"]


def test_after_an_int8_run_the_memory_and_its_session_say_what_the_store_really_costs_per_token(int8_lm):
    """Needs `WorkingMemory.kv_bytes_per_token` to read the store's dtype (memory.py)."""
    mem = int8_lm.memory(capacity=16, evict=4)
    int8_lm.generate("The keeper", memory=mem, max_new_tokens=20, temperature=0, ignore_eos=True)
    real = mem.store.nbytes // mem.store.slots
    assert real == store_bytes_per_token(int8_lm.network)
    assert mem.kv_bytes_per_token == mem.snapshot()["kv_bytes_per_token"] == real
    wmgen.sessions.save(mem, "int8")
    shown = json.loads(ok(runner.invoke(app, ["inspect-memory", "-s", "int8", "--json"])))
    assert shown["kv_bytes_per_token"] == real and shown["kv_bytes"] == real * mem.fill
