"""Finding a GPT-2 checkpoint (local folder or hub id) and loading it.

Weights load from safetensors only, mapped from the file rather than read into
memory first: no pickle, no remote code, no second copy of the weights in memory.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from wmgen.errors import ModelError, UsageError
from wmgen.tokens import Tokenizer

CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]


@dataclass(frozen=True)
class ModelInfo:
    """What the checkpoint's config.json says; cheap to read, no torch needed."""

    folder: Path
    name: str
    n_positions: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    raw: dict


def find_model(name: str, *, download: bool = True) -> Path:
    """The local folder holding checkpoint `name`: the folder itself, or the hub's
    cache (fetching on first use unless offline)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise UsageError(f"no model folder at {name}: pass a folder with config.json, model.safetensors and a tokenizer")
    return _from_hub(name, download=download)


def _from_hub(repo_id: str, *, download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except HFValidationError:
        raise UsageError(f"'{repo_id}' is neither a model folder nor a valid hub model id") from None
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


def read_info(folder: Path, name: str) -> ModelInfo:
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json: is it a GPT-2 checkpoint folder?") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {config_path}: {e}") from None
    if raw.get("model_type", "gpt2") != "gpt2":
        raise ModelError(f"{name} is a '{raw.get('model_type')}' model; wmgen runs GPT-2 checkpoints only")
    for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(unsupported):
            raise ModelError(f"{name} sets {unsupported}, which wmgen does not implement")
    try:
        return ModelInfo(
            folder=folder,
            name=name,
            n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            n_layer=int(raw["n_layer"]),
            n_embd=int(raw["n_embd"]),
            n_head=int(raw["n_head"]),
            vocab_size=int(raw["vocab_size"]),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{config_path} is not a GPT-2 config (missing or bad {e})") from None


def load_tokenizer(name: str) -> tuple[ModelInfo, Tokenizer]:
    """The tokenizer alone (and the config), without torch: for views that need no weights."""
    folder = find_model(name)
    return read_info(folder, name), Tokenizer.from_folder(folder)


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
    if dtype == "int8":  # int8 weights, float32 activations (GPT2's int8 mode)
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_int8(device: str) -> None:
    from wmgen.gpt2 import int8_available

    if device != "cpu":
        raise UsageError(f"--dtype int8 runs on the CPU only; add --device cpu (or use bfloat16 on {device})")
    if not int8_available():
        raise UsageError("--dtype int8 needs torch's fbgemm int8 kernels (x86 CPUs), which this torch lacks; use --dtype float32")


def load_model(info: ModelInfo, *, device: str = "auto", dtype: str = "auto"):
    """The network (`GPT2`) of the checkpoint `info` describes, on `device` in `dtype`."""
    from wmgen.gpt2 import ACTIVATIONS, GPT2, GPT2Config

    device = "cpu" if dtype == "int8" and device == "auto" else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if dtype == "int8":
        check_int8(device)
    weights_path = info.folder / "model.safetensors"
    if not weights_path.is_file():
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
        layer_norm_epsilon=float(info.raw.get("layer_norm_epsilon", 1e-5)),
        activation_function=info.raw.get("activation_function", "gelu_new"),
        eos_token_id=info.raw.get("eos_token_id"),
    )
    if config.activation_function not in ACTIVATIONS:
        raise ModelError(f"{info.name} uses activation '{config.activation_function}', which wmgen does not implement")
    tied = {"wte.weight", "transformer.wte.weight"}
    with mapped_allocations():
        weights = read_safetensors(weights_path, dtype=torch_dtype, device=device, transpose=tied)
        try:
            return GPT2(config, weights, int8=dtype == "int8")
        except KeyError as e:
            raise ModelError(f"{weights_path} lacks the GPT-2 weight {e}") from None


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


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def read_safetensors(path: Path, *, dtype, device: str, transpose: set[str] = frozenset()) -> dict:
    """Tensors from a safetensors file, without reading it into memory first.

    Each tensor is a view of its own private, copy-on-write mapping of the file:
    its pages are read when first touched and given back as soon as the tensor is
    freed (weights repacked at load time leave nothing behind: no second copy, no
    holes in the heap). Tensors converted to another dtype or device are copies.
    Names in `transpose` are stored transposed (a contiguous `[in, out]` buffer,
    returned as its `.t()` view), converted row block by row block.
    """
    import torch

    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            base = 8 + header_len
            out = {}
            for name, meta in header.items():
                if name == "__metadata__" or not name.endswith((".weight", ".bias")):
                    continue
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise ModelError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
                stored = getattr(torch, SAFETENSORS_DTYPES[meta["dtype"]])
                begin, end = meta["data_offsets"]
                tensor = _map_tensor(f, base + begin, end - begin, meta["shape"], stored)
                if name in transpose:
                    out[name] = _transposed(tensor, dtype, device).t()
                else:
                    out[name] = tensor.to(device=device, dtype=dtype)
            return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ModelError(f"cannot read weights from {path}: {e}") from None


def _map_tensor(f, offset: int, nbytes: int, shape, dtype):
    """A tensor over bytes `offset..offset+nbytes` of file `f`, mapped, not read."""
    import torch

    if nbytes != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{nbytes} bytes do not hold a {dtype} tensor of shape {shape}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(f.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start).view(shape)


def _transposed(tensor, dtype, device, rows_per_block: int = 4096):
    import torch

    rows, cols = tensor.shape
    out = torch.empty((cols, rows), dtype=dtype, device=device)
    for start in range(0, rows, rows_per_block):
        out[:, start : start + rows_per_block].copy_(tensor[start : start + rows_per_block].t())
    return out
