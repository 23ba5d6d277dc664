"""Settings: one frozen object, built once from layers of sources and validated once.

Precedence, lowest to highest: built-in defaults < the chosen preset or config file
(`configs/default.toml` when none is chosen) < the user config file < `WMGEN_*`
environment variables < command-line flags. Each value remembers where it came
from, so an error can name the file and key, the variable or the flag to fix.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from wmgen.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


@dataclass(frozen=True)
class ModelSettings:
    name: str = "gpt2"
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class MemorySettings:
    capacity: int | None = None  # None: the model's n_positions
    keep: int | str = 0  # a count, or "prompt": pin the whole prompt
    evict: int | None = None  # None: default_evict(capacity, keep)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class RunSettings:
    max_new_tokens: int = 100
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    sampling: Sampling = field(default_factory=Sampling)
    run: RunSettings = field(default_factory=RunSettings)
    preset: str = "default"


# flat key -> (section, field). The flat key is the flag (--top-k), the environment
# variable (WMGEN_TOP_K) and, in its section, the config file key.
KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"),
    "device": ("model", "device"),
    "dtype": ("model", "dtype"),
    "capacity": ("memory", "capacity"),
    "keep": ("memory", "keep"),
    "evict": ("memory", "evict"),
    "temperature": ("sampling", "temperature"),
    "top_k": ("sampling", "top_k"),
    "top_p": ("sampling", "top_p"),
    "repetition_penalty": ("sampling", "repetition_penalty"),
    "seed": ("sampling", "seed"),
    "max_new_tokens": ("run", "max_new_tokens"),
    "stop": ("run", "stop"),
    "ignore_eos": ("run", "ignore_eos"),
}
SECTION_CLASSES = {"model": ModelSettings, "memory": MemorySettings, "sampling": Sampling, "run": RunSettings}


# --- where things live ---------------------------------------------------------


def home(env: Mapping[str, str]) -> Path | None:
    return Path(env["WMGEN_HOME"]).expanduser() if env.get("WMGEN_HOME") else None


def user_config_path(env: Mapping[str, str]) -> Path:
    if (h := home(env)) is not None:
        return h / "config.toml"
    import platformdirs

    return Path(platformdirs.user_config_dir("wmgen")) / "config.toml"


def state_dir(env: Mapping[str, str]) -> Path:
    if (h := home(env)) is not None:
        return h
    import platformdirs

    return Path(platformdirs.user_state_dir("wmgen"))


def preset_folder():
    """The packaged presets (`configs/` installed as `wmgen.configs`), or `configs/`
    beside the package in a source checkout or editable install."""
    try:
        return resources.files("wmgen.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


def presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    out = {}
    for entry in sorted(preset_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            text = entry.read_text(encoding="utf-8")
            out[entry.name.removesuffix(".toml")] = tomllib.loads(text).get("description", "")
    return out


# --- reading sources ---------------------------------------------------------


def read_config_file(text: str, label: str) -> dict[str, tuple[object, str]]:
    """Flat key -> (value, where) from a TOML config; unknown keys are errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{label} is not valid TOML: {e}") from None
    out = {}
    by_file_key = {(KEYS[k][0], "model" if k == "model" else KEYS[k][1]): k for k in KEYS}
    for section, body in data.items():
        if section == "description":
            continue
        if section not in SECTION_CLASSES or not isinstance(body, dict):
            raise UsageError(f"{label}: unknown section or key '{section}'; sections are {', '.join(SECTION_CLASSES)}")
        for key, value in body.items():
            flat = by_file_key.get((section, key))
            if flat is None:
                known = ", ".join(k for (s, k) in by_file_key if s == section)
                raise UsageError(f"{label}: unknown key '{key}' in [{section}]; known keys: {known}")
            out[flat] = (value, f"{label} [{section}] {key}")
    return out


def preset_layer(config: str | None) -> tuple[str, dict]:
    """The preset or config file chosen with --config (default.toml when none)."""
    name = config or "default"
    path = Path(name).expanduser()
    if name.endswith(".toml") or "/" in name or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot read config file {name}: {e.strerror}") from None
        return str(path), read_config_file(text, str(path))
    entry = preset_folder() / f"{name}.toml"
    if not entry.is_file():
        raise UsageError(f"unknown preset '{name}'; presets: {', '.join(presets())} (or pass a path to a .toml file)")
    return name, read_config_file(entry.read_text(encoding="utf-8"), f"preset '{name}'")


def user_layer(env: Mapping[str, str]) -> dict:
    path = user_config_path(env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsageError(f"cannot read user config {path}: {e.strerror}") from None
    return read_config_file(text, str(path))


def env_layer(env: Mapping[str, str]) -> dict:
    return {k: (env[f"WMGEN_{k.upper()}"], f"WMGEN_{k.upper()}") for k in KEYS if env.get(f"WMGEN_{k.upper()}", "") != ""}


def flag_layer(flags: Mapping[str, object]) -> dict:
    return {k: (v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None and v != ()}


# --- turning raw values into typed, checked ones -------------------------------


def _int(value, where: str, *, auto_ok: bool = False):
    if auto_ok and (value is None or value == "auto"):
        return None
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise UsageError(f"{where}: expected a whole number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        extra = " or 'auto'" if auto_ok else ""
        raise UsageError(f"{where}: expected a whole number{extra}, got {value!r}") from None


def _float(value, where: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected a number, got {value!r}") from None


def _bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{where}: expected true or false, got {value!r}")


def _choice(value, where: str, choices) -> str:
    if value not in choices:
        raise UsageError(f"{where}: '{value}' is not one of {', '.join(choices)}")
    return value


def _stop(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{where}: expected a string or a list of strings")


def _keep(value, where: str) -> int | str:
    if value == "prompt":
        return "prompt"
    keep = _int(value, where)
    if keep < 0:
        raise UsageError(f"{where}: keep must be a count >= 0 or 'prompt'")
    return keep


def coerce(key: str, value, where: str):
    """One raw value (TOML, environment string or flag) as its typed, checked self."""
    if key == "model":
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{where}: expected a model name or folder")
        return value
    if key == "device":
        return _choice(value, where, DEVICES)
    if key == "dtype":
        return _choice(value, where, DTYPES)
    if key == "capacity":
        capacity = _int(value, where, auto_ok=True)
        if capacity is not None and capacity < 2:
            raise UsageError(f"{where}: capacity {capacity} is too small; it must be at least 2 tokens")
        return capacity
    if key == "keep":
        return _keep(value, where)
    if key == "evict":
        evict = _int(value, where, auto_ok=True)
        if evict is not None and evict < 1:
            raise UsageError(f"{where}: evict {evict} must be at least 1 (1 is the exact sliding window)")
        return evict
    if key == "temperature":
        t = _float(value, where)
        if not t >= 0 or t == float("inf"):
            raise UsageError(f"{where}: temperature {value} must be >= 0 (0 is greedy)")
        return t
    if key == "top_k":
        k = _int(value, where)
        if k < 0:
            raise UsageError(f"{where}: top-k {k} must be >= 0 (0 turns it off)")
        return k
    if key == "top_p":
        p = _float(value, where)
        if not 0 < p <= 1:
            raise UsageError(f"{where}: top-p {value} must be in (0, 1] (1 turns it off)")
        return p
    if key == "repetition_penalty":
        r = _float(value, where)
        if not 0 < r < float("inf"):
            raise UsageError(f"{where}: repetition penalty {value} must be > 0 (1 turns it off)")
        return r
    if key == "seed":
        if value is None or value == "random":
            return None
        seed = _int(value, where)
        if not 0 <= seed < 2**63:
            raise UsageError(f"{where}: seed must be between 0 and 2**63 - 1")
        return seed
    if key == "max_new_tokens":
        n = _int(value, where)
        if n < 0:
            raise UsageError(f"{where}: max new tokens {n} must be >= 0")
        return n
    if key == "stop":
        return _stop(value, where)
    if key == "ignore_eos":
        return _bool(value, where)
    raise KeyError(key)


def load_settings(*, flags: Mapping[str, object], env: Mapping[str, str], config: str | None = None) -> Settings:
    """Merge the layers, coerce and check every value, and build `Settings`."""
    preset, preset_values = preset_layer(config)
    merged: dict[str, tuple[object, str]] = {}
    for layer in (preset_values, user_layer(env), env_layer(env), flag_layer(flags)):
        merged.update(layer)
    sections: dict[str, dict] = {s: {} for s in SECTION_CLASSES}
    for key, (value, where) in merged.items():
        section, name = KEYS[key]
        sections[section][name] = coerce(key, value, where)
    built = {s: cls(**sections[s]) for s, cls in SECTION_CLASSES.items()}
    return Settings(**built, preset=preset)


def as_dict(s: Settings) -> dict:
    """Settings as plain data (for JSON output and session files)."""
    out = {"preset": s.preset}
    for section in SECTION_CLASSES:
        obj = getattr(s, section)
        out[section] = {f.name: (list(v) if isinstance(v := getattr(obj, f.name), tuple) else v) for f in fields(obj)}
    return out
