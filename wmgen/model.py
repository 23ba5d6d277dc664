"""Finding a GPT-2 checkpoint (local folder or hub id) and loading it.

Weights load from safetensors only, mapped from the file rather than read into
memory first: no pickle, no remote code, no second copy of the weights in memory.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from wmgen import files, kernels
from wmgen.errors import ModelError, UsageError
from wmgen.files import one_line
from wmgen.tokens import Tokenizer, read_text

CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
CONFIG_LIMIT = 1 << 20  # bytes of config.json (gpt2's: 0.7 kB)
HEADER_LIMIT = 100 << 20  # bytes of a safetensors header (gpt2's: 15 kB)
SIZE_LIMIT = 1 << 20  # the largest n_layer, n_embd, n_head, vocab_size, n_positions taken
ACTIVATION_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")  # gpt2.ACTIVATIONS, without torch


@dataclass(frozen=True)
class ModelInfo:
    """What the checkpoint's config.json says, validated; cheap to read, no torch needed."""

    folder: Path
    name: str
    n_positions: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    raw: dict
    n_inner: int | None = None  # the MLP's width; None is 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    eos_token_id: int | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"


def find_model(name: str, *, download: bool = True) -> Path:
    """The local folder holding checkpoint `name`: the folder itself, or the hub's
    cache (fetching on first use unless offline)."""
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # ~someone who does not exist
        raise ModelError(f"no model folder at {name}: there is no such user's home folder") from None
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as e:
        raise ModelError(f"cannot read the model folder {name}: {e.strerror}") from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            return path
        what = "a file" if stat.S_ISREG(mode) else files.kind(mode)
        raise ModelError(f"{name} is {what}, not a model folder: pass the folder that holds config.json, model.safetensors and a tokenizer")
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ModelError(f"no model folder at {name}: pass a folder with config.json, model.safetensors and a tokenizer")
    return _from_hub(name, download=download)


def _from_hub(repo_id: str, *, download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except HFValidationError:
        raise ModelError(f"'{repo_id}' is neither a model folder nor a valid hub model id; pass a folder with --model PATH") from None
    except Exception:
        if not download:
            raise ModelError(f"model '{repo_id}' is not in the local cache; run wmgen generate --model {repo_id} once online") from None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"model '{repo_id}' is not in the local cache and HF_HUB_OFFLINE is set; "
            "unset it to download the model once, or pass a local folder with --model PATH"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:
        why = type(e).__name__
        raise ModelError(
            f"model '{repo_id}' is not in the local cache and could not be fetched from the hub ({why}); "
            "connect once to cache it, or pass a local folder with --model PATH"
        ) from None


# --- config.json ---------------------------------------------------------------------


def read_info(folder: Path, name: str) -> ModelInfo:
    """The checkpoint's config.json, checked field by field: every problem is one
    ModelError that names the file and the field."""
    path = folder / "config.json"
    if not os.path.lexists(path):
        raise ModelError(f"{folder} has no config.json: is it a GPT-2 checkpoint folder?")
    try:
        raw = json.loads(read_text(path, CONFIG_LIMIT))
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path} is not valid JSON: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} holds {_json_kind(raw)}, not a JSON object; is it a GPT-2 config?")
    if "model_type" in raw and raw["model_type"] != "gpt2":
        raise ModelError(f"{path}: model_type is {_show(raw['model_type'])}; wmgen runs GPT-2 checkpoints only")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(key):
            raise ModelError(f"{path} sets {key}, which wmgen does not implement")
    for key, why in (("scale_attn_weights", "it always scales attention"), ("tie_word_embeddings", "its output head is always wte")):
        if raw.get(key, True) is not True:
            raise ModelError(f"{path} sets {key} to {_show(raw[key])}, which wmgen does not implement ({why})")

    def whole(key: str, low: int = 1, default: int | None = None) -> int:
        if key not in raw:
            if default is not None:
                return default
            raise ModelError(f"{path} has no {key}: a GPT-2 config needs n_layer, n_embd, n_head and vocab_size")
        value = raw[key]
        if type(value) is not int:
            raise ModelError(f"{path}: {key} must be a whole number, not {_show(value)}")
        if not low <= value <= SIZE_LIMIT:
            raise ModelError(f"{path}: {key} {value} is outside {low}..{SIZE_LIMIT}")
        return value

    positions = "n_positions" if "n_positions" in raw or "n_ctx" not in raw else "n_ctx"
    n_positions = whole(positions, 2, default=1024)
    n_layer, n_embd, n_head, vocab_size = whole("n_layer"), whole("n_embd"), whole("n_head"), whole("vocab_size")
    if n_embd % n_head:
        raise ModelError(f"{path}: n_head {n_head} does not divide n_embd {n_embd}; every head needs n_embd / n_head dimensions")
    n_inner = None if raw.get("n_inner") is None else whole("n_inner")
    epsilon = raw.get("layer_norm_epsilon", 1e-5)
    if not _positive_number(epsilon):
        raise ModelError(f"{path}: layer_norm_epsilon must be a positive finite number, not {_show(epsilon)}")
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ACTIVATION_NAMES:
        raise ModelError(f"{path}: activation_function {_show(activation)} is not one wmgen implements ({', '.join(ACTIVATION_NAMES)})")
    eos = raw.get("eos_token_id")
    if eos is not None and (type(eos) is not int or not 0 <= eos < vocab_size):
        raise ModelError(f"{path}: eos_token_id must be a token id in 0..{vocab_size - 1} (vocab_size {vocab_size}) or null, not {_show(eos)}")
    return ModelInfo(
        folder=folder, name=name, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        vocab_size=vocab_size, raw=raw, n_inner=n_inner, layer_norm_epsilon=float(epsilon),
        activation_function=activation, eos_token_id=eos,
    )


def _positive_number(value) -> bool:
    if type(value) not in (int, float):
        return False
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return False
    return math.isfinite(value) and value > 0


def _show(value, limit: int = 40) -> str:
    """A value from a file, as JSON, on one short line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), "a value")


def load_tokenizer(name: str) -> tuple[ModelInfo, Tokenizer]:
    """The tokenizer alone (and the config), without torch: for views that need no weights."""
    folder = find_model(name)
    info = read_info(folder, name)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.id_limit > info.vocab_size:
        raise ModelError(
            f"the tokenizer in {folder} has token ids up to {tokenizer.id_limit - 1}, but {info.config_path} says "
            f"vocab_size {info.vocab_size}; the tokenizer and config.json do not belong together"
        )
    return info, tokenizer


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: no Apple GPU is available here; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype in QUANTIZED:  # quantized weights, float32 activations
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


QUANTIZED = ("int8", "int4")  # --dtype values that are weight formats (`wmgen.formats`)
KV_BFLOAT16 = bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())  # the CPU multiplies bfloat16 natively
VALUE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes of one stored key or value element


def kv_dtype(dtype: str, device: str, shape: tuple[int, int, int], cache: Path | None = None) -> str:
    """The dtype keys and values are stored in (its name: float32, bfloat16 or
    float16) by a model loaded with the settings' `dtype` (auto, float32, bfloat16,
    float16, int8, int4) on `device` (auto, cpu, cuda, mps): its activations', except
    for quantized weights on a CPU with native bfloat16 arithmetic, where bfloat16
    halves what attention reads, and is used where a step's attention over the
    model's `shape` (heads, head dimension, positions) measures faster with it
    (`kernels.store_dtype`, cached in `cache`; int8 is approximate already, and its
    fidelity to float32 did not move).

    Reads no weights, and imports no torch unless only torch can tell (that
    measurement, or dtype auto where a CUDA device may be present), so a preview
    says what a run will hold: a choice is made once per process and shape."""
    if dtype in QUANTIZED:  # quantized weights run on the CPU only
        return _store_dtype(shape, cache) if KV_BFLOAT16 else "float32"
    if dtype != "auto":
        return dtype
    if device in ("cpu", "mps") or device == "auto" and not _may_have_cuda():
        return "float32"  # auto is float32 everywhere but on CUDA
    return str(resolve_dtype("auto", resolve_device(device))).removeprefix("torch.")


@functools.cache
def _store_dtype(shape: tuple[int, int, int], cache: Path | None) -> str:
    return next(iter(kernels.store_dtype(*shape, cache).kernels.values()))


def store_shape(info: ModelInfo) -> tuple[int, int, int]:
    """What `kv_dtype` measures attention over: heads, head dimension, positions."""
    return info.n_head, info.n_embd // info.n_head, info.n_positions


def _may_have_cuda() -> bool:
    """False where no CUDA (or ROCm) device can be present: macOS, and Linux without a GPU driver's device files."""
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))
    return True


def check_quantized(dtype: str, device: str, info: ModelInfo | None = None) -> None:
    """That `--dtype int8` or `int4` can run on `device` with this torch (and, given
    `info`, on this checkpoint's shapes)."""
    from wmgen.formats import Int4, available

    if device != "cpu":
        raise UsageError(f"--dtype {dtype} runs on the CPU only; add --device cpu (or use bfloat16 on {device})")
    if not available(dtype):
        kernels = "one of torch's int8 kernels (fbgemm, oneDNN or int8pack)" if dtype == "int8" else "torch's 4-bit kernel (_weight_int4pack_mm_for_cpu)"
        raise UsageError(f"--dtype {dtype} needs {kernels}, which this torch lacks; use --dtype float32")
    if dtype == "int4" and info is not None:
        inner = info.n_inner or 4 * info.n_embd
        if info.n_embd % Int4.GROUP or inner % Int4.GROUP:
            raise UsageError(f"--dtype int4 quantizes groups of {Int4.GROUP} inputs, and this model's n_embd {info.n_embd} "
                             f"(or inner size {inner}) is not a multiple of {Int4.GROUP}; use --dtype int8")


def load_model(info: ModelInfo, *, device: str = "auto", dtype: str = "auto", forced_kernels: tuple[str, ...] = (),
               kernel_cache: Path | None = None):
    """The network (`GPT2`) of the checkpoint `info` describes, on `device` in `dtype`;
    `forced_kernels` and `kernel_cache` as `GPT2` takes them."""
    import torch

    from wmgen.gpt2 import GPT2, GPT2Config

    device = "cpu" if dtype in QUANTIZED and device == "auto" else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if dtype in QUANTIZED:
        check_quantized(dtype, device, info)
    weights_path = info.folder / "model.safetensors"
    if not os.path.lexists(weights_path):
        if any(info.folder.glob("*.bin")):
            raise ModelError(
                f"{info.folder} has only pickle (.bin) weights; wmgen loads safetensors only. "
                "Convert them once with transformers: save_pretrained(folder, safe_serialization=True)"
            )
        raise ModelError(f"{info.folder} has no model.safetensors")
    config = GPT2Config(
        vocab_size=info.vocab_size,
        n_positions=info.n_positions,
        n_embd=info.n_embd,
        n_layer=info.n_layer,
        n_head=info.n_head,
        layer_norm_epsilon=info.layer_norm_epsilon,
        activation_function=info.activation_function,
        eos_token_id=info.eos_token_id,
    )
    with mapped_allocations():
        check = lambda tensors: check_weights(info, weights_path, tensors)  # noqa: E731
        weights = read_safetensors(weights_path, dtype=torch_dtype, device=device, check=check)
        try:
            stored = getattr(torch, kv_dtype(dtype, device, store_shape(info), kernel_cache))
            return GPT2(config, weights, weight_format=dtype if dtype in QUANTIZED else None, kv_dtype=stored,
                        forced_kernels=forced_kernels, kernel_cache=kernel_cache)
        except KeyError as e:
            raise ModelError(f"{weights_path} lacks the GPT-2 weight {e}") from None


def expected_shapes(info: ModelInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """GPT-2's tensors for `info` (names without `transformer.`): shape, and the config
    fields that make it. `wpe.weight` may have more rows than n_positions."""
    E, inner = info.n_embd, info.n_inner or 4 * info.n_embd
    embd = f"n_embd {E}"
    mlp = f"n_embd {E}, n_inner {info.n_inner}" if info.n_inner else embd
    shapes = {
        "wte.weight": ((info.vocab_size, E), f"vocab_size {info.vocab_size}, n_embd {E}"),
        "wpe.weight": ((info.n_positions, E), f"n_positions {info.n_positions}, n_embd {E}"),
        "ln_f.weight": ((E,), embd),
        "ln_f.bias": ((E,), embd),
    }
    for i in range(info.n_layer):
        for name, shape, why in (
            ("ln_1.weight", (E,), embd), ("ln_1.bias", (E,), embd),
            ("attn.c_attn.weight", (E, 3 * E), embd), ("attn.c_attn.bias", (3 * E,), embd),
            ("attn.c_proj.weight", (E, E), embd), ("attn.c_proj.bias", (E,), embd),
            ("ln_2.weight", (E,), embd), ("ln_2.bias", (E,), embd),
            ("mlp.c_fc.weight", (E, inner), mlp), ("mlp.c_fc.bias", (inner,), mlp),
            ("mlp.c_proj.weight", (inner, E), mlp), ("mlp.c_proj.bias", (E,), embd),
        ):
            shapes[f"h.{i}.{name}"] = (shape, why)
    return shapes


BLOCK = re.compile(r"h\.(\d+)\.")


def check_weights(info: ModelInfo, path: Path, tensors: dict[str, "TensorEntry"]) -> None:
    """That the tensors in `path` are the ones `info` (config.json) describes: every
    GPT-2 tensor present with its shape, no block beyond n_layer. Extra tensors (old
    checkpoints' attention-mask buffers, an lm_head tied to wte) are left alone."""
    inconsistent = "the checkpoint is inconsistent: fix config.json or use the checkpoint's own"
    names: dict[str, str] = {}  # without `transformer.` -> as in the file
    for name in tensors:
        short = name.removeprefix("transformer.")
        if short in names:
            raise ModelError(f"{path} has both {_name(names[short])} and {_name(name)}; a checkpoint holds each tensor once")
        names[short] = name
    blocks = {int(m.group(1)) for short in names if (m := BLOCK.match(short))}
    if blocks and max(blocks) >= info.n_layer:
        raise ModelError(f"{info.config_path} says n_layer {info.n_layer} but {path} has block h.{max(blocks)}; {inconsistent}")
    if missing := [i for i in range(info.n_layer) if i not in blocks]:
        raise ModelError(f"{info.config_path} says n_layer {info.n_layer} but {path} has no block h.{missing[0]}; {inconsistent}")
    for short, (shape, why) in expected_shapes(info).items():
        if short not in names:
            raise ModelError(f"{path} lacks the GPT-2 weight {short}; is it a GPT-2 checkpoint?")
        have = tensors[names[short]].shape
        fits = len(have) == 2 and have[0] >= shape[0] and have[1] == shape[1] if short == "wpe.weight" else have == shape
        if not fits:
            raise ModelError(f"{info.config_path} says {why} but {path} has {_name(names[short])} {list(have)}; {inconsistent}")


@contextmanager
def mapped_allocations(threshold: int = 1 << 20, after: int = 32 << 20):
    """While weights are repacked, have glibc serve every allocation over
    `threshold` with its own mapping, given back when freed. Left to itself, glibc
    moves big allocations onto its heap once a big block has been freed, and the
    heap keeps the holes that repacking leaves behind: ~60 MB for gpt2. Afterwards
    the threshold is `after` (glibc's own ceiling for it), so that activations are
    reused from the heap, as glibc would do. A no-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield
        return
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, after)


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # the ones loaded
ITEMSIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it, checked against the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data that follows the header
    end: int


def read_safetensors(path: Path, *, dtype, device: str, check=None) -> dict:
    """Tensors from a safetensors file, without reading it into memory first.

    The header is checked entry by entry before any tensor is built, and then
    passed to `check` (a function of `{name: TensorEntry}` that raises if the
    tensors are not the ones expected). Each tensor is a view of its own private,
    copy-on-write mapping of the file: its pages are read when first touched and
    given back as soon as the tensor is freed (weights repacked at load time leave
    nothing behind: no second copy, no holes in the heap). Tensors converted to
    another dtype or device are copies.
    """
    import torch

    try:
        weights = files.open_regular(path)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except files.FileProblem as e:
        raise ModelError(f"{path} {e}; put the checkpoint's own file there") from None
    with weights as f:
        try:
            tensors, base = read_header(f, path)
            if check is not None:
                check(tensors)
            out = {}
            for name, entry in tensors.items():
                if not name.endswith((".weight", ".bias")):
                    continue
                if entry.dtype not in SAFETENSORS_DTYPES:
                    raise ModelError(
                        f"{path}: tensor {_name(name)} has dtype {entry.dtype}, which wmgen does not load; "
                        f"convert the checkpoint to one of {', '.join(SAFETENSORS_DTYPES)}"
                    )
                stored = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
                tensor = _map_tensor(f, base + entry.begin, entry.end - entry.begin, entry.shape, stored)
                out[name] = tensor.to(device=device, dtype=dtype)
            return out
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise ModelError(f"cannot read weights from {path}: {one_line(e)}") from None


def read_header(f, path: Path) -> tuple[dict[str, TensorEntry], int]:
    """The tensors a safetensors file's header lists, each checked against the file's
    size; and the offset of the data in the file."""
    size = os.fstat(f.fileno()).st_size
    truncated = "the file is truncated or not safetensors; download or convert it again"
    if size < 8:
        raise ModelError(f"{path} is {size} bytes, too short for a safetensors file; {truncated}")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
        raise ModelError(f"{path}: the header length {header_len} runs past the end of the file ({size} bytes); {truncated}")
    if header_len > HEADER_LIMIT:
        raise ModelError(f"{path}: the header is {header_len} bytes, more than the {HEADER_LIMIT >> 20} MiB taken; is it a safetensors file?")
    blob = f.read(header_len)
    if len(blob) != header_len:
        raise ModelError(f"{path}: the header ends early; {truncated}")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelError(f"{path}: the header is not valid JSON ({one_line(e, 80)}); {truncated}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: the header holds {_json_kind(header)}, not a JSON object; {truncated}")
    data = size - 8 - header_len
    return {name: _entry(path, name, meta, data) for name, meta in header.items() if name != "__metadata__"}, 8 + header_len


def _entry(path: Path, name: str, meta, data: int) -> TensorEntry:
    """The header's `meta` for tensor `name`, checked: a ModelError naming both if it is
    not a tensor of the data's `data` bytes."""
    where = f"{path}: tensor {_name(name)}"
    if not isinstance(meta, dict):
        raise ModelError(f"{where} is described by {_json_kind(meta)}, not a JSON object; the header is broken")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise ModelError(f"{where} has dtype {_show(dtype)}, which is not a safetensors dtype; the header is broken")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ModelError(f"{where} has shape {_show(shape)}; a shape is a list of whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int and n >= 0 for n in offsets)):
        raise ModelError(f"{where} has data_offsets {_show(offsets)}; they are two whole numbers >= 0")
    if (count := _count(shape)) is None:
        raise ModelError(f"{where} has shape {_show(shape)}, larger than any tensor can be; the header is broken")
    begin, end = offsets
    if not begin <= end <= data:
        raise ModelError(f"{where} has data_offsets [{begin}, {end}] outside the file's {data} bytes of data; the file is truncated or broken")
    if end - begin != count * ITEMSIZES[dtype]:
        raise ModelError(f"{where} has {end - begin} bytes, but {dtype} {_show(shape)} takes {count * ITEMSIZES[dtype]}; the header is broken")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _count(shape: list[int], limit: int = 1 << 48) -> int | None:
    """The number of elements of `shape`; None when its non-zero sizes multiply past
    `limit` (a tensor torch could not even describe, empty or not)."""
    count = 1
    for n in shape:
        count *= n or 1
        if count > limit:
            return None
    return 0 if 0 in shape else count


def _name(name: str) -> str:
    """A tensor name from a file, printable on one line."""
    return name if name.isprintable() and len(name) <= 100 else _show(name, 100)


def _map_tensor(f, offset: int, nbytes: int, shape, dtype):
    """A tensor over bytes `offset..offset+nbytes` of file `f`, mapped, not read."""
    import torch

    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(f.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start).view(shape)

