"""Settings: one frozen object, built once from layers of sources and validated once.

Precedence, lowest to highest: built-in defaults < the chosen preset or config file
(`configs/default.toml` when none is chosen) < the user config file < `WMGEN_*`
environment variables < command-line flags. Every value is checked in the layer
that holds it (a bad one is reported even when a higher layer overrides it), and
each winning value remembers where it came from (`Settings.sources`), so an error,
also one the engine raises later (`blame`), names the file and key, the variable or
the flag to fix.
"""

from __future__ import annotations

import codecs
import difflib
import math
import operator
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from wmgen import files
from wmgen.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")

# `WMGEN_*` variables that are not settings (KERNELS forces the kernels a model
# runs through; see wmgen.kernels).
OTHER_VARIABLES = ("WMGEN_HOME", "WMGEN_DEBUG", "WMGEN_KERNELS", "WMGEN_SERVER", "WMGEN_API_KEY")
POLICIES = ("oldest", "boundary", "attention")  # wmgen.policies.POLICIES, without importing it

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; anything this big is a mistake
LARGEST_COUNT = 2**63 - 1  # counts and seeds fit in 64 bits (TOML's integers, torch's)
MAX_NEW_TOKENS = 10**9  # days of generation at any speed; beyond it a typo, not a wish
MAX_LOOKAHEAD = 64  # draft tokens: past ~8 a check costs more than it can win


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
    policy: str = "oldest"  # which tokens a full memory forgets: oldest, boundary, attention
    recent: int | None = None  # attention: recent tokens always kept; None: half of capacity - keep


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
    lookahead: int = 0  # draft tokens checked per step at most (`wmgen.lookup`); 0: off


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    sampling: Sampling = field(default_factory=Sampling)
    run: RunSettings = field(default_factory=RunSettings)
    preset: str = "default"
    # flat key -> where its value came from (`--top-k`, `WMGEN_TOP_K`,
    # `path.toml [sampling] top_k`); keys left at their built-in default are absent.
    # Not part of equality or the hash: two runs with the same values are the same.
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def where(self, key: str) -> str | None:
        """The flag, variable or config key that set `key`; None for a built-in default."""
        return self.sources.get(key)


# flat key -> (section, field). The flat key is the flag (--top-k), the environment
# variable (WMGEN_TOP_K) and, in its section, the config file key.
KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"),
    "device": ("model", "device"),
    "dtype": ("model", "dtype"),
    "capacity": ("memory", "capacity"),
    "keep": ("memory", "keep"),
    "evict": ("memory", "evict"),
    "policy": ("memory", "policy"),
    "recent": ("memory", "recent"),
    "temperature": ("sampling", "temperature"),
    "top_k": ("sampling", "top_k"),
    "top_p": ("sampling", "top_p"),
    "repetition_penalty": ("sampling", "repetition_penalty"),
    "seed": ("sampling", "seed"),
    "max_new_tokens": ("run", "max_new_tokens"),
    "stop": ("run", "stop"),
    "ignore_eos": ("run", "ignore_eos"),
    "lookahead": ("run", "lookahead"),
}
SECTION_CLASSES = {"model": ModelSettings, "memory": MemorySettings, "sampling": Sampling, "run": RunSettings}


# --- where things live ---------------------------------------------------------


def home(env: Mapping[str, str]) -> Path | None:
    return _expanded(Path(env["WMGEN_HOME"])) if env.get("WMGEN_HOME") else None


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


def kernel_cache(env: Mapping[str, str]) -> Path:
    """The file that remembers which kernels run fastest on this machine."""
    if (h := home(env)) is not None:
        return h / "cache" / "kernels.json"
    import platformdirs

    return Path(platformdirs.user_cache_dir("wmgen")) / "kernels.json"


def forced_kernels(env: Mapping[str, str]) -> tuple[str, ...]:
    """The kernels `WMGEN_KERNELS` forces (see `wmgen.kernels`); none when unset."""
    from wmgen.kernels import parse

    text = env.get("WMGEN_KERNELS", "")
    return parse(text, "WMGEN_KERNELS") if text else ()


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
            try:
                description = files.parse_toml(files.utf8(entry.read_bytes())).get("description", "")
            except files.FileProblem as e:
                description = f"(this preset {e})"
            out[entry.name.removesuffix(".toml")] = description
    return out


# --- text that must be UTF-8 -----------------------------------------------------


def shown(text: str) -> str:
    """`text` safe to put in a one-line message: control characters and lone
    surrogates (undecodable bytes from argv or a file name) as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def check_utf8(text: str, where: str) -> str:
    """`text` unchanged, or a UsageError naming `where` when it holds bytes that were
    not UTF-8 (Python keeps them as lone surrogates, `'caf\\udce9'`)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        offset = len(text[: e.start].encode("utf-8"))
        raise UsageError(
            f"{where}: the text is not UTF-8 ({what} at byte {offset}); "
            "give UTF-8 text (check the encoding of the terminal, the file or the variable)"
        ) from None
    return text


def config_text(data: bytes, label: str) -> str:
    """Bytes of a config file as text; a UTF-8 byte order mark is allowed and dropped."""
    try:
        return files.utf8(data.removeprefix(codecs.BOM_UTF8))
    except files.FileProblem as e:
        raise UsageError(f"{label} {e}; save it as UTF-8") from None


def read_config_text(path: Path, label: str) -> str:
    """The text of a config file: a regular file of at most `MAX_CONFIG_BYTES` (a
    FIFO would wait for a writer forever). FileNotFoundError goes to the caller."""
    try:
        return config_text(files.read_regular(path, MAX_CONFIG_BYTES), label)
    except files.FileProblem as e:
        raise UsageError(f"{label} {e}; give a TOML file") from None
    except ValueError as e:  # a NUL in the path
        raise UsageError(f"cannot read config file {label}: {e}") from None


# --- reading sources ---------------------------------------------------------


def read_config_file(text: str, label: str) -> dict[str, tuple[object, str]]:
    """Flat key -> (value, where) from a TOML config; unknown keys are errors."""
    try:
        data = files.parse_toml(text)
    except files.FileProblem as e:
        raise UsageError(f"{label} {e}") from None
    out = {}
    by_file_key = {(KEYS[k][0], "model" if k == "model" else KEYS[k][1]): k for k in KEYS}
    for section, body in data.items():
        if section == "description":
            continue
        if section not in SECTION_CLASSES or not isinstance(body, dict):
            raise UsageError(f"{label}: unknown section or key '{shown(section)}'; sections are {', '.join(SECTION_CLASSES)}")
        for key, value in body.items():
            flat = by_file_key.get((section, key))
            if flat is None:
                known = ", ".join(k for (s, k) in by_file_key if s == section)
                raise UsageError(f"{label}: unknown key '{shown(key)}' in [{section}]; known keys: {known}")
            out[flat] = (value, f"{label} [{section}] {key}")
    return out


def preset_layer(config: str | None) -> tuple[str, dict]:
    """The preset or config file chosen with --config (default.toml when none)."""
    name = config or "default"
    path = _expanded(Path(name))
    if name.endswith(".toml") or "/" in name or _is_file(path):
        label = shown(str(path))
        try:
            data = read_config_text(path, label)
        except FileNotFoundError:
            raise UsageError(f"cannot read config file {shown(name)}: no such file") from None
        return str(path), read_config_file(data, label)
    entry = preset_folder() / f"{name}.toml"
    if not _is_file(entry):
        raise UsageError(f"unknown preset '{shown(name)}'; presets: {', '.join(presets())} (or pass a path to a .toml file)")
    label = f"preset '{name}'"
    return name, read_config_file(config_text(entry.read_bytes(), label), label)


def _expanded(path: Path) -> Path:
    try:
        return path.expanduser()
    except (RuntimeError, ValueError):  # ~someone who does not exist (or a NUL): just a name
        return path


def _is_file(path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL
        return False


def user_layer(env: Mapping[str, str]) -> dict:
    path = user_config_path(env)
    label = shown(str(path))
    try:
        data = read_config_text(path, label)
    except FileNotFoundError:
        return {}
    return read_config_file(data, label)


def env_layer(env: Mapping[str, str]) -> dict:
    return {k: (env[f"WMGEN_{k.upper()}"], f"WMGEN_{k.upper()}") for k in KEYS if env.get(f"WMGEN_{k.upper()}", "") != ""}


def flag_layer(flags: Mapping[str, object], given: str = "flag") -> dict:
    """Values given on the command line (`--top-k`) or, `given="argument"`, to a
    library call (`top_k`)."""
    label = (lambda k: f"--{k.replace('_', '-')}") if given == "flag" else (lambda k: k)
    return {k: (v, label(k)) for k, v in flags.items() if v is not None and v != ()}


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """Names of `WMGEN_*` variables wmgen does not read (typos, most likely), sorted."""
    known = set(known_variables())
    return sorted(name for name in env if name.startswith("WMGEN_") and name not in known)


def known_variables() -> tuple[str, ...]:
    return tuple(f"WMGEN_{k.upper()}" for k in KEYS) + OTHER_VARIABLES


def unknown_env_warning(name: str) -> str:
    """One line for the CLI to print about a variable from `unknown_env`."""
    close = difflib.get_close_matches(name.upper(), known_variables(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{shown(name)} is not a wmgen variable{hint}; it is ignored"


# --- turning raw values into typed, checked ones -------------------------------
# Messages show parsed numbers or repr()s, never raw text: a value may hold a newline.


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits (or one inside a list)
        return "a number of more than 4300 digits" if isinstance(value, int) else f"a {type(value).__name__} too large to show"
    return text if len(text) <= 60 else text[:45] + "..." + text[-10:]


def _int(value, where: str, *, auto_ok: bool = False):
    if auto_ok and (value is None or value == "auto"):
        return None
    extra = " or 'auto'" if auto_ok else ""
    wrong = isinstance(value, bool) or not isinstance(value, (int, float, str))
    if wrong or isinstance(value, float) and not value.is_integer():  # NaN and inf too
        raise UsageError(f"{where}: expected a whole number{extra}, got {_short(value)}")
    try:
        n = int(value)
    except ValueError:  # also a string of more than 4300 digits
        raise UsageError(f"{where}: expected a whole number{extra}, got {_short(value)}") from None
    if abs(n) > LARGEST_COUNT:
        raise UsageError(f"{where}: {_short(value)} is too large (at most 2**63 - 1)")
    return n


def _float(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{where}: expected a number, got {_short(value)}")
    try:
        x = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond float's range
        raise UsageError(f"{where}: expected a number, got {_short(value)}") from None
    if not math.isfinite(x):
        raise UsageError(f"{where}: expected a finite number, got {x}")
    return x + 0.0  # -0.0 is 0.0


def _bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (int, str)) else ""
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{where}: expected true or false, got {_short(value)}")


def _count_or_auto(value, where: str, low: int, too_low: str) -> int | None:
    """An integer >= `low`, or "auto" (None); `too_low` says what is wrong with a smaller one."""
    count = _int(value, where, auto_ok=True)
    if count is not None and count < low:
        raise UsageError(f"{where}: {too_low.format(count)}")
    return count


def _choice(value, where: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{where}: {_short(value)} is not one of {', '.join(choices)}")
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


def _texts(value):
    """The strings inside a raw value (a string, or a list of them)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def coerce(key: str, value, where: str):
    """One raw value (TOML, environment string or flag) as its typed, checked self.

    Accepted: model a non-empty name or folder; device, dtype one of their choices;
    capacity an integer >= 2 or "auto" (the model's limit is checked when the model
    is known); keep an integer >= 0 or "prompt"; evict an integer >= 1 or "auto";
    policy one of oldest, boundary, attention; recent an integer >= 0 or "auto";
    temperature a finite number >= 0; top_k an integer >= 0 (0, or any count at or
    above the vocabulary, keeps every token); top_p finite in (0, 1];
    repetition_penalty finite > 0; seed 0..2**63 - 1 or "random"; max_new_tokens
    0..10**9; stop a string or a list of strings; ignore_eos a boolean; lookahead
    0..64. Counts are
    at most 2**63 - 1; NaN and infinities are refused everywhere."""
    for text in _texts(value):
        check_utf8(text, where)
    if key == "model":
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise UsageError(f"{where}: expected a model name or folder")
        return value
    if key == "device":
        return _choice(value, where, DEVICES)
    if key == "dtype":
        return _choice(value, where, DTYPES)
    if key == "capacity":
        return _count_or_auto(value, where, 2, "capacity {} is too small; it must be at least 2 tokens")
    if key == "keep":
        return _keep(value, where)
    if key == "evict":
        return _count_or_auto(value, where, 1, "evict {} must be at least 1 (1 is the exact sliding window)")
    if key == "policy":
        return _choice(value, where, POLICIES)
    if key == "recent":
        return _count_or_auto(value, where, 0, "recent {} must be at least 0")
    if key == "temperature":
        t = _float(value, where)
        if t < 0:
            raise UsageError(f"{where}: temperature {t} must be >= 0 (0 is greedy)")
        return t
    if key == "top_k":
        k = _int(value, where)
        if k < 0:
            raise UsageError(f"{where}: top-k {k} must be >= 0 (0 turns it off)")
        return k
    if key == "top_p":
        p = _float(value, where)
        if not 0 < p <= 1:
            raise UsageError(f"{where}: top-p {p} must be in (0, 1] (1 turns it off)")
        return p
    if key == "repetition_penalty":
        r = _float(value, where)
        if not r > 0:
            raise UsageError(f"{where}: repetition penalty {r} must be > 0 (1 turns it off)")
        return r
    if key == "seed":
        if value is None or value == "random":
            return None
        seed = _int(value, where)
        if not 0 <= seed <= LARGEST_COUNT:
            raise UsageError(f"{where}: seed must be between 0 and 2**63 - 1")
        return seed
    if key == "max_new_tokens":
        n = _int(value, where)
        if not 0 <= n <= MAX_NEW_TOKENS:
            raise UsageError(f"{where}: max new tokens {n} must be between 0 and 10**9")
        return n
    if key == "stop":
        return _stop(value, where)
    if key == "ignore_eos":
        return _bool(value, where)
    if key == "lookahead":
        n = _int(value, where)
        if not 0 <= n <= MAX_LOOKAHEAD:
            raise UsageError(f"{where}: lookahead {n} must be between 0 (off) and {MAX_LOOKAHEAD} draft tokens")
        return n
    raise KeyError(key)


# --- a library call's arguments ------------------------------------------------
# A library caller gives Python values, not text: a count is an int (not a bool, a
# float or the string "8"), a text is a str UTF-8 can encode (bytes are not text), a
# folder a str or a path. Each concept is checked here, once, and an error names the
# argument as the caller wrote it (`key` is set where the argument is a setting).

NUMBER_KEYS = ("temperature", "top_p", "repetition_penalty")
COUNT_KEYS = ("capacity", "keep", "evict", "recent", "top_k", "seed", "max_new_tokens", "lookahead")
WORDS = {"capacity": ("auto",), "evict": ("auto",), "recent": ("auto",), "keep": ("prompt",), "seed": ("random",)}


def argument(key: str, value):
    """A library call's value for setting `key`, of the setting's own type (counts
    are ints, `temperature`, `top_p` and `repetition_penalty` ints or floats, `stop`
    a str or a list of them, `ignore_eos` a bool, names strs; the words `coerce`
    knows are kept: keep "prompt", seed "random", capacity, evict and recent "auto"),
    then checked as `coerce` checks it. None is returned as None (not given)."""
    if value is None:
        return None
    if key == "model" and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value in WORDS.get(key, ()):
        pass
    elif key in COUNT_KEYS:
        if (n := _index(value)) is None:  # the range is coerce's to say
            raise UsageError(f"{key}: expected a whole number (an int), got {_short(value)}", key=key)
        value = n
    elif key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UsageError(f"{key}: expected a number (an int or a float), got {_short(value)}", key=key)
    elif key == "stop" and not isinstance(value, (str, list, tuple)):
        raise UsageError(f"{key}: expected a string or a list of strings, got {_short(value)}", key=key)
    elif key == "ignore_eos":
        value = flag(value, key)
    try:
        return coerce(key, value, key)
    except UsageError as e:
        raise UsageError(str(e), key=key) from None


def whole(value, where: str, *, low: int | None = 0, high: int | None = LARGEST_COUNT, key: str | None = None) -> int:
    """An int argument in `low..high` (None: unbounded): not a bool, a float or a
    string (a numpy or torch integer is taken as the int it is)."""
    n = _index(value)
    if n is None:
        raise UsageError(f"{where}: expected a whole number (an int), got {_short(value)}", key=key)
    if low is not None and n < low or high is not None and n > high:
        bound = "2**63 - 1" if high == LARGEST_COUNT else str(high)
        raise UsageError(f"{where}: {_short(n)} is outside {low}..{bound}", key=key)
    return n


def _index(value) -> int | None:
    """The int `value` is (an int, or a numpy or torch integer); None for anything
    else, a bool included."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return None
    try:
        return operator.index(value)
    except (TypeError, ValueError):  # a tensor that is not a single integer
        return None


def flag(value, where: str) -> bool:
    """A bool argument: True or False, not a count or a word."""
    if not isinstance(value, bool):
        raise UsageError(f"{where}: expected True or False, got {_short(value)}")
    return value


def utf8_text(value, where: str) -> str:
    """A text argument: a str that UTF-8 can encode (bytes are decoded by the caller)."""
    if not isinstance(value, str):
        hint = "; decode bytes first" if isinstance(value, (bytes, bytearray)) else ""
        raise UsageError(f"{where}: expected text (a str), got {_short(value)}{hint}")
    return check_utf8(value, where)


def items(value, where: str, what: str) -> list:
    """A list argument (a list, tuple, range, array or iterator; not a str, bytes, a
    dict or a set) as a list; `what` says what was expected."""
    if isinstance(value, (str, bytes, bytearray, memoryview, Mapping, set, frozenset)) or not hasattr(value, "__iter__"):
        raise UsageError(f"{where}: expected {what}, got {_short(value)}")
    return list(value)


def token_ids(value, vocab_size: int, where: str, what: str = "token ids (a list of ints)") -> list[int]:
    """Token ids: ints (not bools) in the vocabulary, `0..vocab_size - 1`."""
    ids = items(value, where, what)
    for i, token in enumerate(ids):
        if (n := _index(token)) is None or not 0 <= n < vocab_size:
            raise UsageError(f"{where}: token ids are whole numbers in 0..{vocab_size - 1}; item {i} is {_short(token)}")
        ids[i] = n
    return ids


def prompt_or_ids(value, vocab_size: int, where: str = "prompt") -> str | list[int]:
    """A prompt: text (see `utf8_text`) or token ids (see `token_ids`)."""
    if isinstance(value, str):
        return utf8_text(value, where)
    return token_ids(value, vocab_size, where, "text (a str) or token ids (a list of ints)")


def callback(value, where: str):
    """None, or something to call."""
    if value is not None and not callable(value):
        raise UsageError(f"{where}: expected a function (or None), got {_short(value)}")
    return value


def folder_path(value, where: str) -> Path:
    """A folder argument: a str or a path the system can name (bytes it could not
    decode are kept as Python keeps them; a lone surrogate or a NUL is refused), with
    `~` expanded."""
    name = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(name, str):
        raise UsageError(f"{where}: expected a folder (a str or a path), got {_short(value)}")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        check_utf8(name, where)  # says where the bad character is
    if "\0" in name:
        raise UsageError(f"{where}: a folder name cannot hold a NUL character")
    return _expanded(Path(name))


def instance(value, module: str, name: str, where: str):
    """`value` if it is a `module.name` (a `wmgen.memory.WorkingMemory`, say), found
    without importing the module: none exists before it is imported."""
    kind = getattr(sys.modules.get(module), name, None)
    if kind is None or not isinstance(value, kind):
        raise UsageError(f"{where}: expected a wmgen.{name}, got {_short(value)}")
    return value


def load_settings(*, flags: Mapping[str, object], env: Mapping[str, str], config: str | None = None,
                  user_config: bool = True, given: str = "flag") -> Settings:
    """Check every value in its own layer (so a bad value is reported where it is
    written, even when a higher layer overrides it), then merge and build `Settings`.
    The library passes `user_config=False` (it reads no user config file) and
    `given="argument"` (its values are keyword arguments, not flags)."""
    preset, preset_values = preset_layer(config)
    layers = (preset_values, user_layer(env) if user_config else {}, env_layer(env), flag_layer(flags, given))
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for i, layer in enumerate(layers):
        for key, (raw, where) in layer.items():
            values[key] = coerce(key, raw, where)
            if i == 0 and config is None:
                sources.pop(key, None)  # default.toml holds the built-in defaults: nobody chose them
            else:
                sources[key] = where
    sections: dict[str, dict] = {s: {} for s in SECTION_CLASSES}
    for key, value in values.items():
        section, name = KEYS[key]
        sections[section][name] = value
    built = {s: cls(**sections[s]) for s, cls in SECTION_CLASSES.items()}
    return Settings(**built, preset=preset, sources=sources)


def blame(error: UsageError, settings: Settings) -> UsageError:
    """`error` about a setting (`error.key`) with the place that value came from in
    front: `WMGEN_CAPACITY: capacity 9999 is outside 2..1024 ...`. Unchanged when
    the error names no key or the value is a built-in default. The new error's key
    is cleared (it is placed now), so blaming twice changes nothing."""
    where = settings.where(error.key) if error.key else None
    if where is None:
        return error
    return UsageError(f"{where}: {error}")


def as_dict(s: Settings) -> dict:
    """Settings as plain data (for JSON output and session files)."""
    out = {"preset": s.preset}
    for section in SECTION_CLASSES:
        obj = getattr(s, section)
        out[section] = {f.name: (list(v) if isinstance(v := getattr(obj, f.name), tuple) else v) for f in fields(obj)}
    return out
