"""Settings: built-in defaults < preset or --config file < user config < WMGEN_*
environment < flags, checked key by key; presets by name (also from a built wheel);
errors that name the file and key, or the variable, to fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import WHERE, env_text, toml_for, toml_value
from wmgen.errors import UsageError
from wmgen.settings import MemorySettings, ModelSettings, RunSettings, Sampling, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESET_FILES = sorted(CONFIGS.glob("*.toml"))


# key -> a value for each layer: (preset/--config file, user config, environment, flag);
# each differs from the layer below it.
LAYER_VALUES = {
    "model": ("file-model", "user-model", "env-model", "flag-model"),
    "device": ("cpu", "cuda", "mps", "auto"),
    "dtype": ("float32", "bfloat16", "float16", "auto"),
    "capacity": (512, 256, 128, 64),
    "keep": (1, 2, 3, "prompt"),
    "evict": (10, 20, 30, 40),
    "policy": ("boundary", "attention", "oldest", "attention"),
    "recent": (5, 6, 7, 8),
    "temperature": (0.1, 0.2, 0.3, 0.4),
    "top_k": (5, 6, 7, 8),
    "top_p": (0.5, 0.6, 0.7, 0.8),
    "repetition_penalty": (1.1, 1.2, 1.3, 1.4),
    "seed": (11, 12, 13, 14),
    "max_new_tokens": (101, 102, 103, 104),
    "stop": ("file-stop", "user-stop", "env-stop", ("flag-stop",)),
    "ignore_eos": (True, False, True, False),
}

DEFAULTS = Settings()


# --- helpers -------------------------------------------------------------------


def get(settings: Settings, key: str):
    _, _, attr, name = WHERE[key]
    return getattr(getattr(settings, attr), name)


def expected(key: str, value):
    """What a raw layer value becomes in Settings."""
    if key == "stop":
        return (value,) if isinstance(value, str) else tuple(value)
    return value


def normalize(key: str, raw):
    """A TOML value as Settings holds it: "auto"/"random" mean None, lists are tuples."""
    if raw in ("auto", "random") and key not in ("device", "dtype"):
        return None
    return expected(key, raw)


@pytest.fixture
def home(tmp_path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


@pytest.fixture
def env(home) -> dict:
    return {"WMGEN_HOME": str(home)}


# --- precedence ------------------------------------------------------------------


@pytest.mark.parametrize("key", list(WHERE))
def test_each_source_overrides_the_one_below_it(key, tmp_path, home, env):
    file_value, user_value, env_val, flag_value = LAYER_VALUES[key]

    assert get(load_settings(flags={}, env=env), key) == get(DEFAULTS, key), "built-in default"

    config = tmp_path / "chosen.toml"
    config.write_text(toml_for(key, file_value), encoding="utf-8")
    assert get(load_settings(flags={}, env=env, config=str(config)), key) == expected(key, file_value), "--config file"

    (home / "config.toml").write_text(toml_for(key, user_value), encoding="utf-8")
    assert get(load_settings(flags={}, env=env, config=str(config)), key) == expected(key, user_value), "user config"

    env[f"WMGEN_{key.upper()}"] = env_text(env_val)
    assert get(load_settings(flags={}, env=env, config=str(config)), key) == expected(key, env_val), "environment"

    assert get(load_settings(flags={key: flag_value}, env=env, config=str(config)), key) == expected(key, flag_value), "flag"


def test_user_config_overrides_a_preset_chosen_by_name(home, env):
    precise = load_settings(flags={}, env=env, config="precise")
    (home / "config.toml").write_text("[sampling]\ntemperature = 0.9\n", encoding="utf-8")
    mine = load_settings(flags={}, env=env, config="precise")
    assert mine.sampling.temperature == 0.9 != precise.sampling.temperature
    assert mine.run.max_new_tokens == precise.run.max_new_tokens, "the rest of the preset still applies"


def test_unset_flags_do_not_override_lower_layers(env):
    env["WMGEN_TOP_K"] = "9"
    flags = {"top_k": None, "temperature": None, "stop": ()}
    s = load_settings(flags=flags, env=env)
    assert s.sampling.top_k == 9
    assert s.sampling.temperature == DEFAULTS.sampling.temperature
    assert s.run.stop == DEFAULTS.run.stop


def test_empty_environment_variable_is_ignored(env):
    env["WMGEN_TEMPERATURE"] = ""
    assert load_settings(flags={}, env=env).sampling.temperature == DEFAULTS.sampling.temperature


# --- presets ---------------------------------------------------------------------


def test_there_is_a_default_and_at_least_three_presets():
    names = {p.stem for p in PRESET_FILES}
    assert "default" in names
    assert len(names - {"default"}) >= 3, names


@pytest.mark.parametrize("path", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
def test_every_preset_loads_by_name_with_the_values_in_its_file(path, env):
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    s = load_settings(flags={}, env=env, config=path.stem)
    assert s.preset == path.stem
    by_file_key = {(section, name): key for key, (section, name, _, _) in WHERE.items()}
    checked = 0
    for section, body in data.items():
        if section == "description":
            continue
        for name, raw in body.items():
            key = by_file_key[(section, name)]
            assert get(s, key) == normalize(key, raw), f"{path.name} [{section}] {name}"
            checked += 1
    assert checked, f"{path.name} sets nothing"


@pytest.mark.parametrize("path", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
def test_every_preset_has_a_description(path):
    description = tomllib.loads(path.read_text(encoding="utf-8")).get("description")
    assert isinstance(description, str) and description.strip()


def test_default_toml_agrees_with_the_built_in_defaults(env):
    data = tomllib.loads((CONFIGS / "default.toml").read_text(encoding="utf-8"))
    by_file_key = {(section, name): key for key, (section, name, _, _) in WHERE.items()}
    for section, body in data.items():
        if section == "description":
            continue
        for name, raw in body.items():
            key = by_file_key[(section, name)]
            assert normalize(key, raw) == get(DEFAULTS, key), f"default.toml [{section}] {name} = {raw!r}"
    loaded = load_settings(flags={}, env=env, config="default")
    for attr, cls in (("model", ModelSettings), ("memory", MemorySettings), ("sampling", Sampling), ("run", RunSettings)):
        assert getattr(loaded, attr) == cls(), f"[{attr}] of default.toml differs from {cls.__name__}()"


def test_no_config_means_the_default_preset(env):
    assert load_settings(flags={}, env=env) == load_settings(flags={}, env=env, config="default")


def test_a_config_file_path_works_like_a_preset(tmp_path, env):
    path = tmp_path / "copy.toml"
    shutil.copy(CONFIGS / "precise.toml", path)
    by_path = load_settings(flags={}, env=env, config=str(path))
    by_name = load_settings(flags={}, env=env, config="precise")
    for attr in ("model", "memory", "sampling", "run"):
        assert getattr(by_path, attr) == getattr(by_name, attr)


# --- special values --------------------------------------------------------------


def test_keep_prompt_from_a_file_the_environment_and_a_flag(tmp_path, env):
    path = tmp_path / "c.toml"
    path.write_text('[memory]\nkeep = "prompt"\n', encoding="utf-8")
    assert load_settings(flags={}, env=env, config=str(path)).memory.keep == "prompt"
    assert load_settings(flags={}, env={**env, "WMGEN_KEEP": "prompt"}).memory.keep == "prompt"
    assert load_settings(flags={"keep": "prompt"}, env=env).memory.keep == "prompt"
    assert load_settings(flags={"keep": "7"}, env=env).memory.keep == 7


@pytest.mark.parametrize(
    "toml, stop",
    [('stop = "###"', ("###",)), ('stop = ["\\n\\n", "END"]', ("\n\n", "END")), ("stop = []", ())],
    ids=["string", "list", "empty-list"],
)
def test_stop_is_a_string_or_a_list_of_strings(tmp_path, env, toml, stop):
    path = tmp_path / "c.toml"
    path.write_text(f"[run]\n{toml}\n", encoding="utf-8")
    assert load_settings(flags={}, env=env, config=str(path)).run.stop == stop


def test_repeated_stop_flags_are_kept_in_order(env):
    assert load_settings(flags={"stop": ("a", "b")}, env=env).run.stop == ("a", "b")


def test_auto_and_random_mean_chosen_at_run_time(tmp_path, env):
    path = tmp_path / "c.toml"
    path.write_text('[memory]\ncapacity = "auto"\nevict = "auto"\n[sampling]\nseed = "random"\n', encoding="utf-8")
    s = load_settings(flags={}, env=env, config=str(path))
    assert (s.memory.capacity, s.memory.evict, s.sampling.seed) == (None, None, None)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("yes", True), ("0", False), ("false", False)])
def test_boolean_environment_values(env, text, value):
    assert load_settings(flags={}, env={**env, "WMGEN_IGNORE_EOS": text}).run.ignore_eos is value


def test_numbers_from_the_environment_are_typed(env):
    s = load_settings(flags={}, env={**env, "WMGEN_TOP_K": "40", "WMGEN_TEMPERATURE": "0.5", "WMGEN_CAPACITY": "256"})
    assert (s.sampling.top_k, s.sampling.temperature, s.memory.capacity) == (40, 0.5, 256)
    assert isinstance(s.sampling.top_k, int) and isinstance(s.sampling.temperature, float)


def test_settings_are_frozen(env):
    s = load_settings(flags={}, env=env)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        s.sampling.temperature = 2.0  # type: ignore[misc]


# --- errors name their source -------------------------------------------------------

BAD_FILE_VALUES = [
    ("temperature", -1.0),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -1),
    ("top_k", 2.5),
    ("max_new_tokens", -1),
    ("capacity", 1),
    ("evict", 0),
    ("keep", -1),
    ("keep", "all"),
    ("device", "tpu"),
    ("dtype", "int3"),
    ("ignore_eos", "maybe"),
    ("stop", 3),
    ("seed", "lucky"),
    ("repetition_penalty", 0.0),
    ("model", ""),
]


@pytest.mark.parametrize("key, value", BAD_FILE_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_FILE_VALUES])
def test_bad_value_in_a_config_file_names_the_file_and_key(tmp_path, env, key, value):
    path = tmp_path / "bad-values.toml"
    path.write_text(toml_for(key, value), encoding="utf-8")
    try:
        load_settings(flags={}, env=env, config=str(path))
    except UsageError as e:
        message = str(e)
    else:
        pytest.fail(f"{WHERE[key][1]} = {toml_value(value)} in a config file was accepted; it should be an error")
    assert "bad-values.toml" in message and WHERE[key][1] in message, message
    assert "\n" not in message


def test_bad_value_in_the_user_config_names_that_file_and_key(home, env):
    (home / "config.toml").write_text("[sampling]\ntop_p = 2.0\n", encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env)
    assert str(home / "config.toml") in str(e.value) and "top_p" in str(e.value)


@pytest.mark.parametrize(
    "variable, value",
    [("WMGEN_TEMPERATURE", "-1"), ("WMGEN_TEMPERATURE", "hot"), ("WMGEN_TOP_P", "2"), ("WMGEN_CAPACITY", "big"),
     ("WMGEN_KEEP", "half"), ("WMGEN_IGNORE_EOS", "maybe"), ("WMGEN_DEVICE", "tpu")],
)
def test_bad_environment_value_names_the_variable(env, variable, value):
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env={**env, variable: value})
    assert variable in str(e.value)


@pytest.mark.parametrize(
    "flag, value, name",
    [("temperature", -0.1, "--temperature"), ("top_k", -1, "--top-k"), ("top_p", 0.0, "--top-p"),
     ("max_new_tokens", -1, "--max-new-tokens"), ("capacity", 1, "--capacity"), ("evict", 0, "--evict")],
)
def test_bad_flag_value_names_the_flag(env, flag, value, name):
    with pytest.raises(UsageError) as e:
        load_settings(flags={flag: value}, env=env)
    assert name in str(e.value)


def test_a_good_flag_does_not_hide_a_bad_lower_layer_value_it_overrides(env):
    """Every layer is checked in its own right: the bad value is reported where it is
    written, though the flag would have replaced it."""
    with pytest.raises(UsageError) as e:
        load_settings(flags={"top_p": 0.5}, env={**env, "WMGEN_TOP_P": "7"})
    assert "WMGEN_TOP_P" in str(e.value)


@pytest.mark.parametrize(
    "text, names",
    [("[sampler]\ntemperature = 0.5\n", ["sampler"]),
     ("[sampling]\ntempreature = 0.5\n", ["tempreature"]),
     ("[run]\ntop_k = 5\n", ["top_k"]),
     ("temperature = 0.5\n", ["temperature"])],
    ids=["unknown-section", "unknown-key", "key-in-the-wrong-section", "key-outside-a-section"],
)
def test_unknown_section_or_key_is_an_error_naming_file_and_key(tmp_path, env, text, names):
    path = tmp_path / "unknown.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env, config=str(path))
    assert "unknown.toml" in str(e.value)
    for name in names:
        assert name in str(e.value)


def test_unknown_key_in_the_user_config_is_an_error(home, env):
    (home / "config.toml").write_text("[run]\nmax_tokens = 5\n", encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env)
    assert "config.toml" in str(e.value) and "max_tokens" in str(e.value)


def test_malformed_toml_is_an_error_naming_the_file(tmp_path, env):
    path = tmp_path / "broken.toml"
    path.write_text("[sampling\ntemperature = ", encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env, config=str(path))
    assert "broken.toml" in str(e.value)


def test_malformed_user_config_is_an_error_naming_it(home, env):
    (home / "config.toml").write_text("temperature = = 1\n", encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env)
    assert str(home / "config.toml") in str(e.value)


def test_missing_config_file_is_an_error_naming_it(tmp_path, env):
    path = tmp_path / "absent.toml"
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env, config=str(path))
    assert "absent.toml" in str(e.value)


def test_unknown_preset_is_an_error_that_lists_the_presets(env):
    with pytest.raises(UsageError) as e:
        load_settings(flags={}, env=env, config="no-such-preset")
    message = str(e.value)
    assert "no-such-preset" in message
    for path in PRESET_FILES:
        assert path.stem in message, f"the message should list the preset {path.stem}: {message}"


# --- presets after a non-editable install ------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (so no build/ lands in the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                      ".hypothesis", "benchmarks", "tests"),
    )
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    wheels = sorted(out.glob("wmgen-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"could not build a wheel offline (pip wheel exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return wheels[0]


def test_wheel_contains_every_preset(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in PRESET_FILES:
            member = f"wmgen/configs/{path.name}"
            assert member in names, f"{member} is missing from {wheel.name}"
            assert z.read(member) == path.read_bytes(), f"{member} differs from configs/{path.name}"


def test_presets_load_by_name_from_a_non_editable_install(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        pytest.skip(f"could not install the wheel offline: {result.stderr.strip()[-500:]}")
    names = [p.stem for p in PRESET_FILES]
    code = (
        "import sys, wmgen\n"
        "from wmgen.settings import load_settings\n"
        "print(wmgen.__file__)\n"
        f"for name in {names!r}:\n"
        "    s = load_settings(flags={}, env={'WMGEN_HOME': sys.argv[1]}, config=name)\n"
        "    print(s.preset, s.sampling.temperature, s.run.max_new_tokens)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "home")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert Path(lines[0]).resolve().is_relative_to(target.resolve()), f"imported wmgen from {lines[0]}, not the wheel"
    for name, line in zip(names, lines[1:], strict=True):
        data = tomllib.loads((CONFIGS / f"{name}.toml").read_text(encoding="utf-8"))
        temperature = data.get("sampling", {}).get("temperature", DEFAULTS.sampling.temperature)
        max_new = data.get("run", {}).get("max_new_tokens", DEFAULTS.run.max_new_tokens)
        assert line.split() == [name, str(float(temperature)), str(max_new)]
