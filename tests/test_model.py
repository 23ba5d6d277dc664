"""Finding and loading a checkpoint: the weights wmgen reads are transformers' weights,
pickle is refused, and a missing or unreachable model is an error a person can act on."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from wmgen.errors import ModelError, UsageError
from wmgen.formats import Linear
from wmgen.model import load_model, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def copy_checkpoint(src: Path, dst: Path, *, weights: bool) -> Path:
    """config.json and the tokenizer of `src` (and its safetensors weights, if asked)."""
    dst.mkdir()
    names = ["config.json", *TOKENIZER_FILES] + (["model.safetensors"] if weights else [])
    for name in names:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it, even if it was imported before the
    autouse fixture set the variable (it reads it once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def hf_pairs(model, hf):
    """(wmgen tensor, the transformers tensor it must equal) for every weight."""
    t = hf.transformer
    pairs = [(model.head, t.wte.weight.T), (model.wpe, t.wpe.weight), (model.ln_f[0], t.ln_f.weight), (model.ln_f[1], t.ln_f.bias)]
    for block, h in zip(model.blocks, t.h, strict=True):
        for mine, theirs in (
            (block.ln_1, h.ln_1), (block.c_attn, h.attn.c_attn), (block.c_proj, h.attn.c_proj),
            (block.ln_2, h.ln_2), (block.c_fc, h.mlp.c_fc), (block.mlp_proj, h.mlp.c_proj),
        ):
            weight, bias = (mine.dense(), mine.bias) if isinstance(mine, Linear) else mine
            pairs += [(weight, theirs.weight), (bias, theirs.bias)]
    return pairs


# --- loading a good checkpoint ----------------------------------------------------------


def test_loaded_weights_equal_transformers_weights(tiny_dir, hf_model):
    info, _ = load_tokenizer(str(tiny_dir))
    model = load_model(info, device="cpu", dtype="float32")
    pairs = hf_pairs(model, hf_model)
    assert len(pairs) == len(list(hf_model.parameters())), "not every transformers weight was compared"
    assert model.nbytes == sum(p.nbytes for p in hf_model.parameters()), "wmgen holds weights that transformers does not"
    for i, (mine, theirs) in enumerate(pairs):
        assert mine.dtype == torch.float32
        assert torch.equal(mine, theirs.detach()), f"weight #{i} differs (shape {tuple(theirs.shape)})"


def test_model_info_matches_the_checkpoint_config(tiny_dir, hf_model):
    info, _ = load_tokenizer(str(tiny_dir))
    c = hf_model.config
    assert (info.n_positions, info.n_layer, info.n_embd, info.n_head, info.vocab_size) == (
        c.n_positions, c.n_layer, c.n_embd, c.n_head, c.vocab_size,
    )
    model = load_model(info, device="cpu", dtype="float32")
    assert model.config.eos_token_id == c.eos_token_id


def test_tokenizer_is_the_checkpoint_tokenizer(tiny_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    _, tokenizer = load_tokenizer(str(tiny_dir))
    text = "The lighthouse keeper, 灯台守 🌊 <|endoftext|> def fib(n):"
    ids = reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    assert tokenizer.eos_id == reference.token_to_id("<|endoftext|>")


def test_load_tokenizer_does_not_need_torch_weights(tiny_dir, tmp_path):
    """Views that need only token text work from config + tokenizer alone."""
    folder = copy_checkpoint(tiny_dir, tmp_path / "no-weights", weights=False)
    info, tokenizer = load_tokenizer(str(folder))
    assert info.folder == folder and tokenizer.encode("hello")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_option_loads_every_tensor_in_that_dtype(tiny_dir, hf_model, dtype):
    info, _ = load_tokenizer(str(tiny_dir))
    model = load_model(info, device="cpu", dtype=dtype)
    want = getattr(torch, dtype)
    assert model.dtype == want
    for mine, theirs in hf_pairs(model, hf_model):
        assert mine.dtype == want
        assert torch.equal(mine, theirs.detach().to(want))


def test_auto_dtype_on_cpu_is_float32(tiny_dir):
    info, _ = load_tokenizer(str(tiny_dir))
    assert load_model(info, device="cpu", dtype="auto").dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_a_usage_error(tiny_dir):
    info, _ = load_tokenizer(str(tiny_dir))
    with pytest.raises(UsageError) as e:
        load_model(info, device="cuda", dtype="float32")
    assert "cuda" in str(e.value).lower() and "cpu" in str(e.value)


# --- checkpoints wmgen refuses ----------------------------------------------------------


def test_folder_without_config_json_is_refused(tmp_path):
    folder = tmp_path / "only-bin"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not really weights")
    with pytest.raises((ModelError, UsageError)) as e:
        info, _ = load_tokenizer(str(folder))
        load_model(info, device="cpu")
    assert "config.json" in str(e.value)
    assert str(folder) in str(e.value)


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tiny_dir, tmp_path):
    folder = copy_checkpoint(tiny_dir, tmp_path / "pickled", weights=False)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    info, _ = load_tokenizer(str(folder))
    with pytest.raises((ModelError, UsageError)) as e:
        load_model(info, device="cpu")
    assert "safetensors" in str(e.value)
    assert not marker.exists(), "the pickle file was unpickled"


def test_folder_without_weights_is_refused_mentioning_safetensors(tiny_dir, tmp_path):
    folder = copy_checkpoint(tiny_dir, tmp_path / "no-weights", weights=False)
    info, _ = load_tokenizer(str(folder))
    with pytest.raises((ModelError, UsageError)) as e:
        load_model(info, device="cpu")
    assert "safetensors" in str(e.value)


def test_truncated_safetensors_is_a_model_error(tiny_dir, tmp_path):
    folder = copy_checkpoint(tiny_dir, tmp_path / "truncated", weights=False)
    data = (tiny_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    info, _ = load_tokenizer(str(folder))
    with pytest.raises(ModelError) as e:
        load_model(info, device="cpu")
    assert "model.safetensors" in str(e.value)


def test_folder_without_tokenizer_is_a_model_error(tiny_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelError) as e:
        load_tokenizer(str(folder))
    assert "tokenizer" in str(e.value)


def test_non_gpt2_config_is_refused(tiny_dir, tmp_path):
    import json

    folder = copy_checkpoint(tiny_dir, tmp_path / "llama", weights=True)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as e:
        load_tokenizer(str(folder))
    assert "llama" in str(e.value)


# --- models that are not there ---------------------------------------------------------


def test_nonexistent_relative_path_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as e:
        load_tokenizer("./nope")
    assert "./nope" in str(e.value)


def test_nonexistent_absolute_path_is_a_model_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError) as e:
        load_tokenizer(str(missing))
    assert str(missing) in str(e.value)


def test_uncached_hub_id_offline_is_a_model_error_mentioning_the_model_option(hub_offline):
    with pytest.raises(ModelError) as e:
        load_tokenizer("wmgen-tests/not-a-cached-model")
    message = str(e.value)
    assert "wmgen-tests/not-a-cached-model" in message
    assert "--model" in message, f"the message should say how to pass a local folder: {message}"
