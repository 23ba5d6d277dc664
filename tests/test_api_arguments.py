"""The library checks its arguments at the door: every public function, given a value
of any type for any of its arguments, either works or raises a `wmgen.WmgenError`
(a `UsageError` naming the argument, for a bad value); an unknown keyword is a
`TypeError`. Whatever a call did or refused, the working memory it was given is
still consistent and usable afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wmgen

PROMPT = "The keeper"
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Opaque:
    """An object of no type any argument takes."""

    def __repr__(self) -> str:
        return "<Opaque>"


class Quiet:
    """A callable that does nothing and says no (a valid `should_stop` and `progress`)."""

    def __call__(self, *args) -> None:
        return None


WORDS = ["", " ", "prompt", "auto", "random", "oldest", "boundary", "attention", "int8", "cpu", "float32", "8", "-1",
         "1e3", "nan", "caf\udce9", "\ud800", "a\x00b", "x" * 300, "~nouser/x", "linear", "sessions", "last"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, 2, 3, 16, 63, 64, 65, -1, -(2**63), 2**63 - 1, 2**63, 2**64, 10**30, 10**5000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, -0.5, float("nan"), float("inf"), -float("inf")]),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.binary(max_size=6),
    st.builds(Opaque),
    st.builds(Quiet),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(st.one_of(st.integers(-3, 500), st.booleans(), st.none(), st.floats(), st.text(max_size=3), st.binary(max_size=2)), max_size=5),
    st.lists(st.integers(0, 50), max_size=5).map(tuple),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    st.sampled_from([[10**5000], [1, 2, True], range(3), {1, 2}, frozenset(), bytearray(b"ab"), Path("x")]),
    st.builds(lambda: iter([1, 2])),
)


def no_absolute_path(value) -> bool:
    """Folders the tests may write into: relative ones, inside the test's own folder."""
    name = os.fspath(value) if isinstance(value, os.PathLike) else value
    return not (isinstance(name, str) and name[:1] in ("/", "~"))


FOLDERS = VALUES.filter(no_absolute_path)


@pytest.fixture(scope="module")
def lm(tiny_dir, one_torch_thread):
    return wmgen.load(str(tiny_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tests' own folder as the working directory and home: relative session
    folders and `~` land in it."""
    folder = tmp_path_factory.mktemp("arguments")
    before, home = os.getcwd(), os.environ.get("HOME")
    os.chdir(folder)
    os.environ["HOME"] = str(folder)
    yield folder
    os.chdir(before)
    if home is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = home


def fresh_memory(lm, policy: str):
    mem = lm.memory(capacity=16, keep=1, evict=4, policy=policy)
    lm.generate(PROMPT, memory=mem, max_new_tokens=3, temperature=0, ignore_eos=True)
    return mem


def bounded(name: str, value):
    """Valid counts too large to run quickly are made small: the checks are the
    point here, not a run of a billion tokens."""
    if name in ("max_new_tokens", "batch_size") and type(value) is int and value > 4:
        return 4
    return value


def settle(result) -> None:
    """Run what a call returned to its end (streams and event iterators too)."""
    if hasattr(result, "__next__"):
        for _ in result:
            pass


def assert_only_wmgen_errors(call, kwargs: dict, unknown: bool) -> None:
    if unknown:
        kwargs = kwargs | {"temprature": 0.5}
    try:
        settle(call(**kwargs))
    except wmgen.WmgenError:
        pass
    except TypeError as e:
        assert unknown and "temprature" in str(e), f"{type(e).__name__}: {e}"
    # anything else escapes, and fails the test with its traceback


def assert_usable(lm, mem) -> None:
    assert len(mem) == mem.fill <= mem.capacity
    assert 0 <= mem.stale <= mem.fill and 0 <= mem.keep < mem.capacity
    out = lm.generate(" ok", memory=mem, max_new_tokens=2, temperature=0, ignore_eos=True)
    assert len(out.tokens) == 2
    assert len(mem) <= mem.capacity and mem.tokens[-2:] == list(out.tokens)


def perturbed(data, defaults: dict, strategies: dict | None = None) -> dict:
    """`defaults` with one to three arguments replaced by values of any type."""
    strategies = strategies or {}
    names = data.draw(st.lists(st.sampled_from(sorted(defaults)), min_size=1, max_size=3, unique=True), label="perturbed")
    out = dict(defaults)
    for name in names:
        out[name] = bounded(name, data.draw(strategies.get(name, VALUES), label=name))
    return out


SHAPE = {"capacity": None, "keep": None, "evict": None, "policy": None, "recent": None}
OPTIONS = {"max_new_tokens": 2, "temperature": 0, "top_k": None, "top_p": None, "repetition_penalty": None, "seed": None,
           "stop": None, "ignore_eos": True} | SHAPE
POLICY = st.sampled_from(["oldest", "boundary", "attention"])


# --- generating ---------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data(), entry=st.sampled_from(["generate", "stream", "events"]), policy=POLICY, unknown=st.booleans())
def test_generating_takes_any_value_for_any_argument_and_raises_only_wmgen_errors(lm, workdir, data, entry, policy, unknown):
    mem = fresh_memory(lm, policy)
    defaults = dict(prompt=" and", memory=mem, from_scratch=False, should_stop=None, **OPTIONS)
    kwargs = perturbed(data, defaults)
    assert_only_wmgen_errors(getattr(lm, entry), kwargs, unknown)
    assert_usable(lm, mem)


@EXAMPLES
@given(data=st.data(), entry=st.sampled_from(["generate_many", "generate_each"]), unknown=st.booleans())
def test_batches_take_any_value_for_any_argument_and_raise_only_wmgen_errors(lm, workdir, data, entry, unknown):
    options = {k: v for k, v in OPTIONS.items() if k != "seed"}
    defaults = dict(prompts=["Hi", [5, 6, 7]], seed=None, batch_size=2, from_scratch=False, should_stop=None, **options)
    prompts = st.one_of(VALUES, st.lists(VALUES, min_size=1, max_size=3))
    kwargs = perturbed(data, defaults, {"prompts": prompts, "seed": st.one_of(VALUES, st.lists(VALUES, min_size=2, max_size=2))})
    assert_only_wmgen_errors(getattr(lm, entry), kwargs, unknown)


# --- memories, scoring, inspecting --------------------------------------------------------


@EXAMPLES
@given(data=st.data(), entry=st.sampled_from(["memory", "shape", "perplexity", "preview"]), unknown=st.booleans())
def test_shaping_and_scoring_take_any_value_for_any_argument_and_raise_only_wmgen_errors(lm, workdir, data, entry, unknown):
    defaults = {
        "memory": SHAPE,
        "shape": SHAPE | {"prompt_tokens": 0},
        "perplexity": SHAPE | {"text": "The keeper climbed the stairs.", "max_tokens": None, "progress": None},
        "preview": SHAPE | {"text": PROMPT, "from_scratch": False},
    }[entry]
    kwargs = perturbed(data, defaults)
    assert_only_wmgen_errors(getattr(lm, entry), kwargs, unknown)


def snapshots(mem):
    """A memory's snapshot, as given or with one field (or one slot's field) replaced."""
    snap = mem.snapshot()
    field = st.sampled_from(sorted(snap))
    slot_field = st.sampled_from(sorted(snap["slots"][0]))
    whole = st.tuples(field, VALUES).map(lambda kv: snap | {kv[0]: kv[1]})
    in_slot = st.tuples(slot_field, VALUES).map(lambda kv: snap | {"slots": [snap["slots"][0] | {kv[0]: kv[1]}, *snap["slots"][1:]]})
    return st.one_of(st.just(snap), whole, in_slot, VALUES)


@EXAMPLES
@given(data=st.data(), entry=st.sampled_from(["restore", "attention", "encode", "decode"]), policy=POLICY, unknown=st.booleans())
def test_restoring_inspecting_and_tokens_take_any_value_and_raise_only_wmgen_errors(lm, workdir, data, entry, policy, unknown):
    mem = fresh_memory(lm, policy)
    defaults = {
        "restore": SHAPE | {"snapshot": mem.snapshot(), "source": "the snapshot"},
        "attention": {"snapshot": mem.snapshot(), "layer": None},
        "encode": {"text": PROMPT, "from_scratch": False},
        "decode": {"ids": [1, 2, 3]},
    }[entry]
    kwargs = perturbed(data, defaults, {"snapshot": snapshots(mem)})
    assert_only_wmgen_errors(getattr(lm, entry), kwargs, unknown)
    assert_usable(lm, mem)


# --- sessions and loading -----------------------------------------------------------------


@EXAMPLES
@given(data=st.data(), entry=st.sampled_from(["save", "load", "read", "listing", "delete"]), unknown=st.booleans())
def test_sessions_take_any_value_for_any_argument_and_raise_only_wmgen_errors(lm, workdir, data, entry, unknown):
    mem = fresh_memory(lm, "oldest")
    wmgen.sessions.save(mem, "there", home=workdir)
    sessions = wmgen.sessions
    defaults = {
        "save": {"memory": mem, "name": "there", "home": workdir, "fallback": False},
        "load": SHAPE | {"name": "there", "model": lm, "home": workdir},
        "read": {"state": workdir, "name": "there"},
        "listing": {"state": workdir},
        "delete": {"state": workdir, "name": "there"},
    }[entry]
    kwargs = perturbed(data, defaults, {"home": FOLDERS, "state": FOLDERS})
    assert_only_wmgen_errors(getattr(sessions, entry), kwargs, unknown)
    assert_usable(lm, mem)


@EXAMPLES
@given(data=st.data(), unknown=st.booleans())
def test_load_takes_any_value_for_any_argument_and_raises_only_wmgen_errors(tiny_dir, workdir, data, unknown):
    defaults = dict(model=str(tiny_dir), device="cpu", dtype="float32", config=None, kernels=None, **OPTIONS)
    kwargs = perturbed(data, defaults, {"model": FOLDERS, "config": FOLDERS})
    assert_only_wmgen_errors(wmgen.load, kwargs, unknown)


# --- what the errors say ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda lm: lm.memory(capacity=8, evict=2.5), "evict: expected a whole number (an int), got 2.5"),
        (lambda lm: lm.memory(capacity=True), "capacity: expected a whole number (an int), got True"),
        (lambda lm: lm.memory(capacity="16"), "capacity: expected a whole number (an int), got '16'"),
        (lambda lm: lm.generate("caf\udce9"), "prompt: the text is not UTF-8 (byte 0xe9 at byte 3)"),
        (lambda lm: lm.generate(b"cafe"), "prompt: expected text (a str) or token ids (a list of ints), got b'cafe'"),
        (lambda lm: lm.generate([1, True]), "prompt: token ids are whole numbers in 0..{top}; item 1 is True"),
        (lambda lm: lm.generate("Hi", stop=[1]), "stop: expected a string or a list of strings"),
        (lambda lm: lm.generate("Hi", seed=10**5000), "seed: a number of more than 4300 digits is too large"),
        (lambda lm: lm.generate("Hi", should_stop=1), "should_stop: expected a function (or None), got 1"),
        (lambda lm: lm.generate("Hi", from_scratch="no"), "from_scratch: expected True or False, got 'no'"),
        (lambda lm: lm.generate("Hi", memory={}), "memory: expected a wmgen.WorkingMemory, got {}"),
        (lambda lm: lm.generate_many("Hi"), "prompts: expected a list of prompts"),
        (lambda lm: lm.generate_many(["Hi"], batch_size=0), "batch_size: 0 is outside 1..2**63 - 1"),
        (lambda lm: lm.perplexity("a b c d", max_tokens=2.0), "max_tokens: expected a whole number (an int), got 2.0"),
        (lambda lm: lm.perplexity("a b c d", progress="yes"), "progress: expected a function (or None), got 'yes'"),
        (lambda lm: lm.attention([]), "snapshot: expected a memory's snapshot (a dict), not list"),
        (lambda lm: lm.decode([lm.info.vocab_size]), "ids: token ids are whole numbers in 0..{top}; item 0 is {vocab}"),
        (lambda lm: wmgen.sessions.save("memory"), "memory: expected a wmgen.WorkingMemory, got 'memory'"),
        (lambda lm: wmgen.sessions.load("last", "gpt2"), "model: expected a wmgen.Model, got 'gpt2'"),
        (lambda lm: wmgen.sessions.listing(5), "state: expected a folder (a str or a path), got 5"),
    ],
)
def test_a_bad_argument_is_a_usage_error_that_names_it(lm, call, words):
    words = words.replace("{top}", str(lm.info.vocab_size - 1)).replace("{vocab}", str(lm.info.vocab_size))
    with pytest.raises(wmgen.UsageError) as caught:
        call(lm)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_setting_given_with_the_wrong_type_says_which_setting(lm):
    with pytest.raises(wmgen.UsageError) as caught:
        lm.generate("Hi", temperature="0.5")
    assert caught.value.key == "temperature"


def test_a_numpy_or_torch_integer_is_a_count_and_a_token_id(lm):
    import torch

    out = lm.generate(torch.tensor([5, 6, 7]), max_new_tokens=torch.tensor(2), temperature=0, ignore_eos=True)
    assert out.prompt_tokens == 3 and len(out.tokens) == 2
