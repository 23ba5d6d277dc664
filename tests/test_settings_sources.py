"""Every value is checked in the layer that holds it, and every error names its source:
the file and `[section] key`, the `WMGEN_*` variable or the `--flag`. Settings remember
where each winning value came from, so errors raised later can say it too (`blame`).
Config files are read only when they are regular UTF-8 files of sane size; text that
is not UTF-8 and `WMGEN_*` typos are caught."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import WHERE, env_text, toml_for
from wmgen.errors import UsageError
from wmgen.settings import (
    DEVICES,
    DTYPES,
    OTHER_VARIABLES,
    blame,
    check_utf8,
    load_settings,
    unknown_env,
    unknown_env_warning,
)

STRING_KEYS = ("model", "device", "dtype", "keep", "stop", "seed", "capacity", "evict", "policy", "recent")
FLOAT_KEYS = ("temperature", "top_p", "repetition_penalty")
INT_KEYS = ("capacity", "keep", "evict", "recent", "top_k", "seed", "max_new_tokens")

# a value each layer accepts for each key
GOOD = {
    "model": "gpt2", "device": "cpu", "dtype": "float32", "capacity": 64, "keep": 4, "evict": 8,
    "policy": "attention", "recent": 16,
    "temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 7,
    "max_new_tokens": 50, "stop": ("END",), "ignore_eos": True,
}
LARGEST = 2**63 - 1


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def variable(key: str) -> str:
    return "WMGEN_" + key.upper()


def file_label(path: Path, key: str) -> str:
    section, name, _, _ = WHERE[key]
    return f"{path} [{section}] {name}"


def get(s, key: str):
    _, _, attr, name = WHERE[key]
    return getattr(getattr(s, attr), name)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def assert_in_accepted_range(key: str, value) -> None:
    """What Settings may hold for each key: the accepted ranges, and nothing else."""
    def count(v, low, high=LARGEST):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    ok = {
        "model": lambda v: isinstance(v, str) and v.strip() != "" and is_utf8(v),
        "device": lambda v: v in DEVICES,
        "dtype": lambda v: v in DTYPES,
        "capacity": lambda v: v is None or count(v, 2),
        "keep": lambda v: v == "prompt" or count(v, 0),
        "evict": lambda v: v is None or count(v, 1),
        "policy": lambda v: v in ("oldest", "boundary", "attention"),
        "recent": lambda v: v is None or count(v, 0),
        "temperature": lambda v: type(v) is float and math.isfinite(v) and v >= 0,
        "top_k": lambda v: count(v, 0),
        "top_p": lambda v: type(v) is float and 0 < v <= 1,
        "repetition_penalty": lambda v: type(v) is float and math.isfinite(v) and v > 0,
        "seed": lambda v: v is None or count(v, 0),
        "max_new_tokens": lambda v: count(v, 0, 10**9),
        "stop": lambda v: isinstance(v, tuple) and all(isinstance(s, str) and is_utf8(s) for s in v),
        "ignore_eos": lambda v: isinstance(v, bool),
    }[key]
    assert ok(value), f"{key} = {value!r} was accepted but is outside its range"


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message, repr(message)


# --- strategies --------------------------------------------------------------------

SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-308, 1e-46, 1e-300, 0.5, 1.0, 1.5, 1e308]
SPECIAL_INTS = [0, 1, 2, -1, 10**9, 10**9 + 1, LARGEST, LARGEST + 1, -(2**63), 10**30]
WORDS = ["auto", "prompt", "random", "cpu", "float32", "gpt2", "", " ", "nan", "inf", "-inf", "-1", "0", "0.5",
         "2.5", "1e999", "1e-46", "5e-324", "true", "maybe", "1" * 30, "9" * 5000]
SURROGATES = st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1, max_size=3)

toml_scalars = st.one_of(
    st.integers(-(2**63), LARGEST),
    st.sampled_from(SPECIAL_INTS),
    st.floats(),
    st.sampled_from(SPECIAL_FLOATS),
    st.booleans(),
    st.sampled_from(WORDS),
    st.text(max_size=8),  # any Unicode but lone surrogates (a file is UTF-8), control characters too
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3)
env_values = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=8),
    st.builds(lambda a, b: a + b, st.text(max_size=3), SURROGATES),  # bytes that were not UTF-8
    st.floats().map(str),
    st.integers().map(str),
)
flag_values = st.one_of(
    toml_scalars,
    st.none(),
    st.builds(lambda a, b: a + b, st.sampled_from(["caf", "", "gpt2"]), SURROGATES),
    st.lists(st.text(max_size=4) | SURROGATES, max_size=3).map(tuple),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def empty_home(tmp_path_factory) -> dict:
    return {"WMGEN_HOME": str(tmp_path_factory.mktemp("empty-home"))}


def load_with(layer: str, key: str, value, folder: Path, *, flags: dict | None = None):
    """Settings with `value` for `key` in one layer; returns (settings or error, label)."""
    home = folder / "home"
    home.mkdir(exist_ok=True)
    env = {"WMGEN_HOME": str(home)}
    user = home / "config.toml"
    user.unlink(missing_ok=True)
    config, all_flags = None, dict(flags or {})
    if layer == "file":
        config = folder / "layer.toml"
        config.write_text(toml_for(key, value), encoding="utf-8")
        label = file_label(config, key)
    elif layer == "user":
        user.write_text(toml_for(key, value), encoding="utf-8")
        label = file_label(user, key)
    elif layer == "env":
        env[variable(key)] = value
        label = variable(key)
    else:
        all_flags[key] = value
        label = flag(key)
    try:
        return load_settings(flags=all_flags, env=env, config=None if config is None else str(config)), label
    except UsageError as e:
        return e, label


# --- every value, every layer: a Settings in range or a one-line error naming its source ---


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(list(WHERE)), layer=st.sampled_from(["file", "user", "env", "flag"]), data=st.data())
def test_any_value_in_any_layer_is_accepted_in_range_or_refused_naming_its_source(folder, key, layer, data):
    value = data.draw({"file": toml_values, "user": toml_values, "env": env_values, "flag": flag_values}[layer])
    result, label = load_with(layer, key, value, folder)
    event("refused" if isinstance(result, UsageError) else "accepted")
    if isinstance(result, UsageError):
        message = str(result)
        assert_one_line(message)
        assert label in message, f"{label!r} not named in {message!r}"
        if layer != "flag":
            # a good flag over the bad value does not hide it
            again, _ = load_with(layer, key, value, folder, flags={key: GOOD[key]})
            assert isinstance(again, UsageError) and str(again) == message
        return
    assert_in_accepted_range(key, get(result, key))
    unset = (layer == "flag" and value in (None, ())) or (layer == "env" and value == "")
    assert result.where(key) == (None if unset else label)


@pytest.mark.parametrize("layer", ["file", "user", "env", "flag"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_and_infinities_are_refused_for_every_float_key(tmp_path, key, layer, value):
    raw = env_text(value) if layer == "env" else value
    result, label = load_with(layer, key, raw, tmp_path)
    assert isinstance(result, UsageError), f"{key} = {value} from {layer} was accepted"
    assert_one_line(str(result))
    assert str(result).startswith(label + ":") and "finite" in str(result)


BAD_COUNTS = [(k, v) for k in INT_KEYS for v in (True, 2.5, math.nan, math.inf, 10**30)] + [
    ("max_new_tokens", 10**9 + 1), ("seed", -1), ("seed", 2**63)]


@pytest.mark.parametrize(
    "layer, key, value",
    # a variable holds text, so a bool is no case there
    [(layer, k, v) for layer in ("file", "env", "flag") for k, v in BAD_COUNTS if not (layer == "env" and v is True)],
)
def test_counts_refuse_booleans_fractions_nan_infinity_and_absurd_sizes(tmp_path, key, value, layer):
    raw = env_text(value) if layer == "env" else value
    result, label = load_with(layer, key, raw, tmp_path)
    assert isinstance(result, UsageError), f"{key} = {value!r} from {layer} was accepted"
    assert_one_line(str(result))
    assert str(result).startswith(label + ":")


@pytest.mark.parametrize(
    "key, value",
    [("max_new_tokens", 10**9), ("top_k", LARGEST), ("seed", LARGEST), ("temperature", 5e-324), ("temperature", 1e308),
     ("top_p", 1e-46), ("top_p", 5e-324), ("repetition_penalty", 5e-324), ("repetition_penalty", 1e308),
     ("temperature", 0), ("top_k", 0), ("max_new_tokens", 0), ("capacity", 2)],
)
def test_the_edges_of_the_accepted_ranges_are_accepted(tmp_path, key, value):
    for layer in ("file", "env", "flag"):
        result, label = load_with(layer, key, env_text(value) if layer == "env" else value, tmp_path)
        assert not isinstance(result, UsageError), f"{label} = {value!r}: {result}"
        assert get(result, key) == value and result.where(key) == label


def test_negative_zero_temperature_is_plain_greedy(empty_home):
    s = load_settings(flags={"temperature": -0.0}, env=empty_home)
    assert s.sampling.temperature == 0 and math.copysign(1, s.sampling.temperature) == 1


@pytest.mark.parametrize("key", list(WHERE))
def test_a_bad_config_file_value_is_reported_though_a_flag_overrides_it(tmp_path, empty_home, key):
    bad = {"model": "", "device": "tpu", "dtype": "int3", "capacity": 1, "keep": -1, "evict": 0, "policy": "newest",
           "recent": -1, "temperature": -1.0,
           "top_k": -1, "top_p": 1.5, "repetition_penalty": 0.0, "seed": "lucky", "max_new_tokens": -1, "stop": 3,
           "ignore_eos": "maybe"}[key]
    path = tmp_path / "bad-but-overridden.toml"
    path.write_text(toml_for(key, bad), encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={key: GOOD[key]}, env=empty_home, config=str(path))
    assert str(e.value).startswith(file_label(path, key) + ":"), str(e.value)


# --- sources -----------------------------------------------------------------------


@pytest.mark.parametrize("key", list(WHERE))
def test_sources_name_the_layer_whose_value_won(tmp_path, key):
    home = tmp_path / "home"
    home.mkdir()
    env = {"WMGEN_HOME": str(home)}
    config = tmp_path / "chosen.toml"
    config.write_text(toml_for(key, GOOD[key]), encoding="utf-8")
    assert load_settings(flags={}, env=env).where(key) is None, "a built-in default has no source"
    assert load_settings(flags={}, env=env, config=str(config)).where(key) == file_label(config, key)
    user = home / "config.toml"
    user.write_text(toml_for(key, GOOD[key]), encoding="utf-8")
    assert load_settings(flags={}, env=env, config=str(config)).where(key) == file_label(user, key)
    env[variable(key)] = env_text(GOOD[key][0] if key == "stop" else GOOD[key])
    assert load_settings(flags={}, env=env, config=str(config)).where(key) == variable(key)
    s = load_settings(flags={key: GOOD[key]}, env=env, config=str(config))
    assert s.where(key) == flag(key)
    assert set(s.sources) == {key}, "only the key that was set has a source"


def test_a_run_with_nothing_chosen_has_no_sources(empty_home):
    s = load_settings(flags={}, env=empty_home)
    assert s.sources == {} and s.where("capacity") is None


def test_a_preset_chosen_by_name_is_the_source_of_its_values(empty_home):
    s = load_settings(flags={}, env=empty_home, config="longform")
    assert s.where("keep") == "preset 'longform' [memory] keep"
    assert s.where("max_new_tokens") == "preset 'longform' [run] max_new_tokens"
    assert s.where("model") is None, "longform does not set the model"


def test_sources_do_not_change_equality_or_the_hash(empty_home):
    by_flag = load_settings(flags={"temperature": 1.0}, env=empty_home)
    by_default = load_settings(flags={}, env=empty_home)
    assert by_flag.sources != by_default.sources
    assert by_flag == by_default and hash(by_flag) == hash(by_default)


# --- blame ---------------------------------------------------------------------------

ENGINE_MESSAGE = "capacity 9999 is outside 2..128 (the model's n_positions); pick a value in range"


def test_blame_puts_the_config_file_and_key_in_front_of_an_engine_error(tmp_path, empty_home):
    path = tmp_path / "x.toml"
    path.write_text("[memory]\ncapacity = 9999\n", encoding="utf-8")
    s = load_settings(flags={}, env=empty_home, config=str(path))
    placed = blame(UsageError(ENGINE_MESSAGE, key="capacity"), s)
    assert str(placed) == f"{path} [memory] capacity: {ENGINE_MESSAGE}"
    assert "--capacity" not in str(placed), "the user gave no flag"
    assert isinstance(placed, UsageError) and placed.exit_code == 2


@pytest.mark.parametrize(
    "flags, env, where",
    [({"capacity": 9999}, {}, "--capacity"), ({}, {"WMGEN_CAPACITY": "9999"}, "WMGEN_CAPACITY")],
    ids=["flag", "variable"],
)
def test_blame_names_the_flag_or_the_variable(empty_home, flags, env, where):
    s = load_settings(flags=flags, env={**empty_home, **env})
    assert str(blame(UsageError(ENGINE_MESSAGE, key="capacity"), s)) == f"{where}: {ENGINE_MESSAGE}"


def test_blame_leaves_an_error_alone_when_the_value_is_a_built_in_default_or_no_key(empty_home):
    s = load_settings(flags={"temperature": 0.5}, env=empty_home)
    about_default = UsageError(ENGINE_MESSAGE, key="capacity")
    about_nothing = UsageError("the prompt is empty")
    assert blame(about_default, s) is about_default
    assert blame(about_nothing, s) is about_nothing


def test_blaming_twice_names_the_source_once(empty_home):
    s = load_settings(flags={"keep": 5}, env=empty_home)
    once = blame(UsageError("keep 5 leaves no room", key="keep"), s)
    assert str(blame(once, s)) == str(once) == "--keep: keep 5 leaves no room"


# --- text that is not UTF-8 ------------------------------------------------------------


def test_check_utf8_returns_utf8_text_unchanged():
    for text in ("", "plain", "naïve café", "日本語", "🙂 emoji", "tab\tand\nnewline"):
        assert check_utf8(text, "--stop") is text


def test_check_utf8_names_the_place_and_the_byte():
    with pytest.raises(UsageError) as e:
        check_utf8("caf\udce9 au lait", "--stop")
    message = str(e.value)
    assert message.startswith("--stop: the text is not UTF-8 (byte 0xe9 at byte 3)"), message
    assert_one_line(message)


@pytest.mark.parametrize("key", STRING_KEYS)
def test_a_flag_or_variable_with_bytes_that_are_not_utf8_is_refused(empty_home, key):
    text = "gpt2\udcff"
    for flags, env, where in (({key: (text,) if key == "stop" else text}, {}, flag(key)), ({}, {variable(key): text}, variable(key))):
        with pytest.raises(UsageError) as e:
            load_settings(flags=flags, env={**empty_home, **env})
        assert str(e.value).startswith(f"{where}: the text is not UTF-8"), str(e.value)
        assert_one_line(str(e.value))


def test_one_bad_stop_among_good_ones_is_refused(empty_home):
    with pytest.raises(UsageError, match="^--stop: the text is not UTF-8"):
        load_settings(flags={"stop": ("END", "fin\udce9")}, env=empty_home)


@pytest.mark.parametrize("where", ["--config", "user config"])
def test_a_config_file_that_is_not_utf8_names_the_file_and_the_offset(tmp_path, where):
    data = b"[sampling]\ntemperature = 0.5\n# caf\xe9\n"
    home = tmp_path / "home"
    home.mkdir()
    path = tmp_path / "latin1.toml" if where == "--config" else home / "config.toml"
    path.write_bytes(data)
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env={"WMGEN_HOME": str(home)}, config=str(path) if where == "--config" else None)
    message = str(e.value)
    assert_one_line(message)
    offset = data.index(b"\xe9")
    assert str(path) in message and "not UTF-8" in message and f"(bad byte at offset {offset})" in message, message


def test_a_config_file_with_a_utf8_byte_order_mark_is_read(tmp_path, empty_home):
    path = tmp_path / "notepad.toml"
    path.write_bytes(b"\xef\xbb\xbf[sampling]\ntemperature = 0.25\n")
    assert load_settings(flags={}, env=empty_home, config=str(path)).sampling.temperature == 0.25


def test_a_config_file_name_that_is_not_utf8_is_shown_escaped(tmp_path, empty_home):
    path = os.path.join(os.fsdecode(tmp_path), "caf\udce9.toml")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=empty_home, config=path)
    assert "caf\\udce9" in str(e.value) and is_utf8(str(e.value))


# --- only regular files of sane size ---------------------------------------------------


def load_in_thread(config: str, env: dict, seconds: float = 10.0):
    """load_settings in a daemon thread: returns its error, or None if it hung."""
    outcome = []

    def run():
        try:
            load_settings(flags={}, env=env, config=config)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return (False, None) if thread.is_alive() else (True, outcome[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_given_as_config_is_refused_without_waiting(tmp_path, empty_home):
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    finished, error = load_in_thread(str(fifo), empty_home)
    if not finished:  # let the stuck reader go before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("load_settings waited on a FIFO given as --config")
    assert isinstance(error, UsageError), repr(error)
    assert_one_line(str(error))
    assert str(fifo) in str(error) and "regular file" in str(error)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_the_user_config_is_refused_without_waiting(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.mkfifo(home / "config.toml")
    finished, error = load_in_thread(None, {"WMGEN_HOME": str(home)})
    if not finished:
        os.close(os.open(home / "config.toml", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_settings waited on a FIFO as the user config")
    assert isinstance(error, UsageError) and str(home / "config.toml") in str(error), repr(error)


names = st.one_of(
    st.text(max_size=12),
    st.builds(lambda a, b, c: a + b + c, st.sampled_from(["", "~", "~nobody-here/", "/", "./", "../", "/dev/"]),
              st.text(max_size=6) | SURROGATES | st.just("\0"), st.sampled_from(["", ".toml", "/x.toml"])),
    st.integers(250, 5000).map(lambda n: "x" * n),
)


@settings(max_examples=150, deadline=None)
@given(config=names, home=names)
def test_any_config_name_or_home_gives_settings_or_a_one_line_error(config, home):
    try:
        load_settings(flags={}, env={"WMGEN_HOME": home}, config=config)
    except UsageError as e:
        assert_one_line(str(e))
        assert is_utf8(str(e)), "a message must print on any terminal"


def test_a_folder_given_as_config_is_refused(tmp_path, empty_home):
    folder = tmp_path / "configs.toml"
    folder.mkdir()
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=empty_home, config=str(folder))
    assert str(folder) in str(e.value) and "folder" in str(e.value)


def test_a_config_file_over_a_mebibyte_is_refused(tmp_path, empty_home):
    path = tmp_path / "huge.toml"
    path.write_text("[sampling]\ntemperature = 0.5\n" + "# padding\n" * 110_000, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=empty_home, config=str(path))
    assert str(path) in str(e.value) and "larger than 1 MiB" in str(e.value)
    assert_one_line(str(e.value))


# --- unknown WMGEN_* variables ------------------------------------------------------------


def test_unknown_wmgen_variables_are_returned_and_known_ones_are_not():
    env = {variable(k): "1" for k in WHERE} | {name: "1" for name in OTHER_VARIABLES}
    env |= {"PATH": "/bin", "XWMGEN_FOO": "1", "WMGEN_TEMPRATURE": "0.5", "WMGEN_TOPK": "4", "WMGEN_temperature": "1"}
    assert unknown_env(env) == ["WMGEN_TEMPRATURE", "WMGEN_TOPK", "WMGEN_temperature"]


def test_the_variables_still_to_come_are_known():
    for name in ("WMGEN_HOME", "WMGEN_DEBUG", "WMGEN_KERNELS", "WMGEN_POLICY", "WMGEN_RECENT"):
        assert unknown_env({name: "x"}) == [], name


def test_an_unknown_variable_warning_suggests_the_closest_name():
    assert unknown_env_warning("WMGEN_TEMPRATURE") == (
        "WMGEN_TEMPRATURE is not a wmgen variable (did you mean WMGEN_TEMPERATURE?); it is ignored"
    )
    assert "did you mean WMGEN_TOP_K?" in unknown_env_warning("WMGEN_TOPK")
    assert unknown_env_warning("WMGEN_QQQQQQQQQQQQ") == "WMGEN_QQQQQQQQQQQQ is not a wmgen variable; it is ignored"


def test_unknown_variables_do_not_stop_or_print_from_load_settings(empty_home, capsys):
    s = load_settings(flags={}, env={**empty_home, "WMGEN_TEMPRATURE": "0.1"})
    assert s.sampling.temperature == 1.0
    assert capsys.readouterr() == ("", "")
