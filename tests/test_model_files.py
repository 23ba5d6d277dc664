"""Checkpoint folders broken one field at a time: config.json, the safetensors header,
the tokenizer files and the folder itself. Each is refused with one line that names the
file (and the field or tensor), exit status 1; none reaches the network as a crash or
runs silently wrong."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT, one_line_error
from wmgen.cli import app
from wmgen.errors import ModelError
from wmgen.model import ACTIVATION_NAMES, find_model, load_model, load_tokenizer, read_info, read_safetensors

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LINKED = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def checkpoint_with(src: Path, dst: Path, config: dict | None = None, *, skip: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder whose files are links to `src`'s, but with its own config.json
    (`config`, or `src`'s)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if name not in skip and (src / name).is_file() and not (dst / name).exists():
            (dst / name).symlink_to(src / name)
    if config is None:
        config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def refused(call) -> str:
    """The message of the ModelError `call()` raises, checked to be one line."""
    with pytest.raises(ModelError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    return message


def load(folder: Path):
    info, tokenizer = load_tokenizer(str(folder))
    return load_model(info, device="cpu", dtype="float32"), tokenizer, info


def generate(folder: Path, *extra: str):
    return runner.invoke(app, ["generate", "-m", str(folder), "-n", "2", *extra, "hi"])


def model_error_line(result) -> str:
    line = one_line_error(result, 1)
    assert "internal error" not in line, line
    return line


@pytest.fixture(scope="module")
def good_config(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


# --- config.json: the examples through the real CLI -----------------------


def test_n_head_that_does_not_divide_n_embd_is_one_line_naming_the_field(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "n_head": 5})
    line = model_error_line(generate(folder))
    assert str(folder / "config.json") in line and "n_head 5" in line and "n_embd 64" in line


def test_vocab_size_smaller_than_the_embedding_is_refused(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "vocab_size": 100})
    line = model_error_line(generate(folder))
    assert "vocab_size 100" in line and str(folder / "config.json") in line


def test_vocab_size_that_disagrees_with_wte_names_both_files(tiny_dir, good_config, tmp_path):
    """Past the tokenizer check (called directly), the weights themselves are checked."""
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "vocab_size": 100, "eos_token_id": None})
    info = read_info(folder, str(folder))
    message = refused(lambda: load_model(info, device="cpu", dtype="float32"))
    assert message == (
        f"{folder}/config.json says vocab_size 100, n_embd 64 but {folder}/model.safetensors has "
        "transformer.wte.weight [50257, 64]; the checkpoint is inconsistent: fix config.json or use the checkpoint's own"
    )


def test_vocab_size_larger_than_the_embedding_is_refused(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "vocab_size": 60000})
    line = model_error_line(generate(folder))
    assert "vocab_size 60000" in line and "wte.weight [50257, 64]" in line


def test_zero_layers_is_refused(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "n_layer": 0})
    line = model_error_line(generate(folder))
    assert str(folder / "config.json") in line and "n_layer 0" in line


@pytest.mark.parametrize(("n_layer", "said"), [(1, "has block h.1"), (3, "has no block h.2")])
def test_n_layer_that_disagrees_with_the_blocks_is_refused(tiny_dir, good_config, tmp_path, n_layer, said):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "n_layer": n_layer})
    line = model_error_line(generate(folder))
    assert f"n_layer {n_layer}" in line and said in line and "model.safetensors" in line


def test_n_positions_beyond_the_position_embeddings_is_refused(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "n_positions": 128})
    line = model_error_line(generate(folder))
    assert "n_positions 128" in line and "wpe.weight [64, 64]" in line


def test_fewer_positions_than_the_embeddings_hold_is_accepted(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "n_positions": 32})
    model, _, info = load(folder)
    assert info.n_positions == 32 and model.wpe.shape[0] == 64


def test_missing_model_folder_exits_1_with_one_line(tmp_path):
    line = model_error_line(generate(tmp_path / "nonexistent"))
    assert str(tmp_path / "nonexistent") in line


def test_a_file_given_as_the_model_folder_is_a_model_error_saying_so(tiny_dir):
    message = refused(lambda: find_model(str(tiny_dir / "config.json")))
    assert str(tiny_dir / "config.json") in message and "is a file, not a model folder" in message


def test_an_invalid_hub_id_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(lambda: find_model("bad id/x"))
    assert "'bad id/x'" in message and "--model" in message


# --- config.json: field by field -------------------------------------------------


def test_config_with_no_object_at_top_level_is_refused(tiny_dir, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m")
    for text, kind in (("[1, 2]", "a list"), ('"gpt2"', "a string"), ("null", "null"), ("12", "a number")):
        (folder / "config.json").write_text(text)
        message = refused(lambda: read_info(folder, "m"))
        assert message.startswith(f"{folder}/config.json holds {kind}, not a JSON object")


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("n_layer", True, "n_layer must be a whole number, not true"),
        ("n_layer", 2.0, "n_layer must be a whole number, not 2.0"),
        ("n_embd", "64", 'n_embd must be a whole number, not "64"'),
        ("n_embd", float("nan"), "n_embd must be a whole number, not NaN"),
        ("n_head", -4, "n_head -4 is outside 1..1048576"),
        ("vocab_size", 1 << 40, "vocab_size 1099511627776 is outside 1..1048576"),
        ("n_positions", 1, "n_positions 1 is outside 2..1048576"),
        ("n_positions", None, "n_positions must be a whole number, not null"),
        ("n_inner", 0, "n_inner 0 is outside 1..1048576"),
        ("layer_norm_epsilon", 0, "layer_norm_epsilon must be a positive finite number, not 0"),
        ("layer_norm_epsilon", float("inf"), "layer_norm_epsilon must be a positive finite number, not Infinity"),
        ("layer_norm_epsilon", "1e-5", 'layer_norm_epsilon must be a positive finite number, not "1e-5"'),
        ("activation_function", "swish", 'activation_function "swish" is not one wmgen implements'),
        ("activation_function", ["gelu"], 'activation_function ["gelu"] is not one wmgen implements'),
        ("eos_token_id", 50257, "eos_token_id must be a token id in 0..50256 (vocab_size 50257) or null, not 50257"),
        ("eos_token_id", [50256], "eos_token_id must be a token id in 0..50256"),
        ("model_type", "llama", 'model_type is "llama"; wmgen runs GPT-2 checkpoints only'),
        ("scale_attn_weights", False, "sets scale_attn_weights to false, which wmgen does not implement"),
        ("tie_word_embeddings", False, "sets tie_word_embeddings to false, which wmgen does not implement"),
    ],
)
def test_config_field_of_the_wrong_kind_or_range_is_named(tiny_dir, good_config, tmp_path, field, value, said):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, field: value})
    message = refused(lambda: read_info(folder, "m"))
    assert message.startswith(str(folder / "config.json")) and said in message


def test_config_without_a_required_field_names_it(tiny_dir, good_config, tmp_path):
    config = {k: v for k, v in good_config.items() if k != "n_embd"}
    folder = checkpoint_with(tiny_dir, tmp_path / "m", config)
    assert refused(lambda: read_info(folder, "m")).startswith(f"{folder}/config.json has no n_embd")


def test_n_ctx_is_read_when_n_positions_is_absent(tiny_dir, good_config, tmp_path):
    config = {k: v for k, v in good_config.items() if k != "n_positions"}
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**config, "n_ctx": 48})
    assert read_info(folder, "m").n_positions == 48
    (folder / "config.json").write_text(json.dumps({**config, "n_ctx": "48"}))
    assert 'n_ctx must be a whole number, not "48"' in refused(lambda: read_info(folder, "m"))


def test_n_inner_is_checked_against_the_mlp_weights(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "n_inner": 256})
    assert load(folder)[2].n_inner == 256  # 4 * n_embd, written out
    (folder / "config.json").write_text(json.dumps({**good_config, "n_inner": 128}))
    message = refused(lambda: load(folder))
    assert "n_embd 64, n_inner 128" in message and "mlp.c_fc.weight [64, 256]" in message


def test_config_that_is_not_json_or_not_utf8_is_one_line(tiny_dir, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"n_layer": 2,\n  "n_embd": \n')
    assert refused(lambda: read_info(folder, "m")).startswith(f"{folder}/config.json is not valid JSON")
    (folder / "config.json").write_bytes(b'{"n_layer": "\xff\xfe"}')
    assert refused(lambda: read_info(folder, "m")).startswith(f"{folder}/config.json is not UTF-8 text")
    (folder / "config.json").write_text("[" * 100_000)  # deep enough to exhaust the parser's recursion
    assert refused(lambda: read_info(folder, "m")).startswith(f"{folder}/config.json is not valid JSON")


def test_oversized_config_is_refused_unread(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(good_config) + " " * (1 << 20))
    message = refused(lambda: read_info(folder, "m"))
    assert message.startswith(f"{folder}/config.json is larger than 1 MiB")


def test_activation_names_are_the_networks_activations():
    """model.py keeps the names without importing torch; they must not drift."""
    from wmgen.gpt2 import ACTIVATIONS

    assert sorted(ACTIVATION_NAMES) == sorted(ACTIVATIONS)


# --- config.json: any field, any value (property) -------------------------------

SIZES = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_ctx", "n_inner")
ODD_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 8, 32, 63, 64, 65, 128, 256, 50256, 50257, 50258, -1, 1 << 20, (1 << 20) + 1, 10**30]),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, False, None, "64", "gelu", "", [], [2], {}, {"n": 2}]),
    st.text(max_size=8),
)
FIELD_VALUES = {
    **{field: ODD_VALUES for field in SIZES},
    "layer_norm_epsilon": st.one_of(st.sampled_from([1e-5, 1e-12, 0.5, 0.0, -1e-5, 10**400, 1e308]), ODD_VALUES),
    "activation_function": st.one_of(st.sampled_from([*ACTIVATION_NAMES, "GELU", "gelu ", "swish", "tanh"]), ODD_VALUES),
    "eos_token_id": st.one_of(st.sampled_from([None, 0, 50255, 50256, 50257, -1]), ODD_VALUES),
}


def agrees_with_the_weights(config: dict) -> bool:
    """Whether `config` truly describes the tiny checkpoint (2 layers, 64 wide, 50257
    tokens, 64 positions, MLP 256 wide), so that loading it must succeed."""

    def whole(v, low=1):
        return type(v) is int and low <= v <= 1 << 20

    positions = config.get("n_positions", config.get("n_ctx", 1024))
    eps = config.get("layer_norm_epsilon", 1e-5)
    eos = config.get("eos_token_id")
    return (
        config.get("n_layer") == 2 and type(config.get("n_layer")) is int
        and config.get("n_embd") == 64 and type(config.get("n_embd")) is int
        and config.get("vocab_size") == 50257 and type(config.get("vocab_size")) is int
        and whole(config.get("n_head")) and 64 % config["n_head"] == 0
        and whole(positions, 2) and positions <= 64
        and config.get("n_inner") in (None, 256) and type(config.get("n_inner")) in (type(None), int)
        and type(eps) in (int, float) and 0 < eps <= sys.float_info.max
        and config.get("activation_function", "gelu_new") in ACTIVATION_NAMES
        and (eos is None or type(eos) is int and 0 <= eos < 50257)
    )


@pytest.fixture(scope="module")
def scratch(tiny_dir, tmp_path_factory) -> Path:
    """One folder linked to the tiny checkpoint; property tests rewrite its config.json."""
    return checkpoint_with(tiny_dir, tmp_path_factory.mktemp("scratch"))


@PROPERTY
@given(changes=st.sets(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=3), data=st.data())
def test_any_config_either_loads_a_working_model_or_is_a_model_error(scratch, good_config, changes, data):
    config = dict(good_config)
    for field in changes:
        config[field] = data.draw(FIELD_VALUES[field], label=field)
    try:
        text = json.dumps(config)
    except (ValueError, OverflowError):
        assume(False)
    (scratch / "config.json").write_text(text)
    try:
        model, tokenizer, info = load(scratch)
    except ModelError as e:
        message = str(e)
        event("refused")
        assert "\n" not in message
        assert str(scratch / "config.json") in message or str(scratch / "model.safetensors") in message, message
        assert not agrees_with_the_weights(config), f"a config that agrees with the weights was refused: {message}"
        return
    assert agrees_with_the_weights(config), f"a config that disagrees with the weights loaded: {config}"
    event("loaded")
    store = model.new_store(4)
    logits = model.logits(model.forward(torch.tensor([tokenizer.encode("The lighthouse")]), 0, store))
    assert logits.shape[-1] == 50257 and torch.isfinite(logits).all()


# --- safetensors headers, field by field ----------------------------------------

TENSORS = {"a.weight": ("F32", [2, 3]), "b.bias": ("F16", [4]), "c.weight": ("BF16", [0, 5])}


def safetensors_bytes(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def small_file() -> tuple[dict, bytes]:
    """A valid header and data for TENSORS, the data counting up byte by byte."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in TENSORS.items():
        nbytes = math.prod(shape) * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, bytes(range(offset))


def read(path: Path) -> dict:
    return read_safetensors(path, dtype=torch.float32, device="cpu")


def test_a_valid_small_file_reads_back_its_bytes(tmp_path):
    header, data = small_file()
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    tensors = read(path)
    assert torch.equal(tensors["a.weight"], torch.frombuffer(bytearray(data[:24]), dtype=torch.float32).view(2, 3))
    assert torch.equal(tensors["b.bias"], torch.frombuffer(bytearray(data[24:32]), dtype=torch.float16).float())
    assert tensors["c.weight"].shape == (0, 5)


def edited(header: dict, name: str, **fields) -> dict:
    return {**header, name: {**header[name], **fields}}


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda h: [1, 2, 3], "the header holds a list, not a JSON object"),
        (lambda h: {**h, "a.weight": [1, 2]}, "tensor a.weight is described by a list, not a JSON object"),
        (lambda h: edited(h, "a.weight", dtype="F31"), 'tensor a.weight has dtype "F31", which is not a safetensors dtype'),
        (lambda h: edited(h, "a.weight", dtype=4), "tensor a.weight has dtype 4"),
        (lambda h: edited(h, "a.weight", dtype="I32"), "tensor a.weight has dtype I32, which wmgen does not load"),
        (lambda h: edited(h, "a.weight", shape=[-2, -3]), "tensor a.weight has shape [-2, -3]"),
        (lambda h: edited(h, "a.weight", shape=[True, 3]), "tensor a.weight has shape [true, 3]"),
        (lambda h: edited(h, "a.weight", shape=[2.0, 3]), "tensor a.weight has shape [2.0, 3]"),
        (lambda h: edited(h, "a.weight", shape="2x3"), 'tensor a.weight has shape "2x3"'),
        (lambda h: edited(h, "a.weight", shape=[3, 3]), "tensor a.weight has 24 bytes, but F32 [3, 3] takes 36"),
        (lambda h: edited(h, "c.weight", shape=[0, 1 << 40, 1 << 40]), "tensor c.weight has shape [0, 1099511627776, 1099511627776], larger"),
        (lambda h: edited(h, "a.weight", shape=[10**30] * 10**4), "tensor a.weight has shape [1000000000000000000000000000000, 10000…, larger"),
        (lambda h: edited(h, "b.bias", data_offsets=[24, 10**6]), "tensor b.bias has data_offsets [24, 1000000] outside"),
        (lambda h: edited(h, "b.bias", data_offsets=[32, 24]), "tensor b.bias has data_offsets [32, 24] outside"),
        (lambda h: edited(h, "b.bias", data_offsets=[-8, 0]), "tensor b.bias has data_offsets [-8, 0]"),
        (lambda h: edited(h, "b.bias", data_offsets=[24]), "tensor b.bias has data_offsets [24]"),
        (lambda h: {k: v for k, v in edited(h, "b.bias", data_offsets=None).items()}, "tensor b.bias has data_offsets null"),
        (lambda h: {**h, "bad\nname.weight": h["a.weight"], "a.weight": 1}, "tensor a.weight is described by a number"),
    ],
)
def test_broken_header_entry_is_one_line_naming_file_and_tensor(tmp_path, edit, said):
    header, data = small_file()
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(edit(header), data))
    message = refused(lambda: read(path))
    assert message.startswith(f"{path}: ") and said in message, message


def test_tensor_names_from_the_file_are_shown_on_one_line(tmp_path):
    header, data = small_file()
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"evil\nname.weight": {**header["a.weight"], "dtype": "F31"}}, data))
    assert '"evil\\nname.weight"' in refused(lambda: read(path))


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda h, d: b"", "is 0 bytes, too short for a safetensors file"),
        (lambda h, d: b"\x01\x02\x03", "is 3 bytes, too short for a safetensors file"),
        (lambda h, d: safetensors_bytes(h, d, length=1 << 40), "the header length 1099511627776 runs past the end of the file"),
        (lambda h, d: safetensors_bytes(h, d, length=2**64 - 1), "runs past the end of the file"),
        (lambda h, d: safetensors_bytes(h, d, length=10), "the header is not valid JSON"),
        (lambda h, d: safetensors_bytes(h, d)[:100], "the header length"),
        (lambda h, d: safetensors_bytes(h, d)[:-5], "outside the file's"),
        (lambda h, d: struct.pack("<Q", 4) + b"\xff\xfe{}" + d, "the header is not valid JSON"),
        (lambda h, d: struct.pack("<Q", 4) + b"null" + d, "the header holds null, not a JSON object"),
    ],
)
def test_truncated_or_mislabelled_file_is_one_line_naming_it(tmp_path, make, said):
    header, data = small_file()
    path = tmp_path / "model.safetensors"
    path.write_bytes(make(header, data))
    message = refused(lambda: read(path))
    assert message.startswith(str(path)) and said in message, message


def test_header_larger_than_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:  # sparse: 200 MiB that take no room
        f.write(struct.pack("<Q", 150 << 20))
        f.truncate(200 << 20)
    assert "more than the 100 MiB taken" in refused(lambda: read(path))


@PROPERTY
@given(data=st.data())
def test_any_header_edit_either_reads_what_it_says_or_is_a_model_error(tmp_path_factory, data):
    header, blob = small_file()
    name = data.draw(st.sampled_from(sorted(TENSORS)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = data.draw(
        st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "f32", None, True, [], {}]),
            st.lists(st.one_of(st.integers(-3, 40), st.booleans(), st.floats(allow_nan=True)), max_size=4),
            st.integers(-5, 50),
        ),
        label="value",
    )
    header = edited(header, name, **{field: value})
    cut = data.draw(st.sampled_from([None, None, None, 0, 7, 8, 20, -1, -4]), label="cut")
    raw = safetensors_bytes(header, blob)
    raw = raw if cut is None else raw[:cut]
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(raw)
    try:
        tensors = read(path)
    except ModelError as e:
        event("refused")
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    event("read")
    base = 8 + len(json.dumps(header).encode())
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[meta["dtype"]])
        expected = torch.frombuffer(bytearray(raw[base + begin : base + end]) or bytearray(1), dtype=torch.uint8)
        expected = expected[: end - begin].view(dtype).view(meta["shape"]).float()
        assert torch.equal(tensors[key], expected) or torch.isnan(expected).any(), key


def checkpoint_with_header(tiny_dir: Path, dst: Path, edit) -> Path:
    """The tiny checkpoint with its safetensors header edited by `edit` (data unchanged)."""
    folder = checkpoint_with(tiny_dir, dst, skip=("model.safetensors",))
    raw = (tiny_dir / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    (folder / "model.safetensors").write_bytes(safetensors_bytes(header, raw[8 + length :]))
    return folder


def test_missing_gpt2_tensor_is_named(tiny_dir, tmp_path):
    folder = checkpoint_with_header(tiny_dir, tmp_path / "m", lambda h: h.pop("transformer.h.1.ln_2.bias"))
    line = model_error_line(generate(folder))
    assert line == f"wmgen: error: {folder}/model.safetensors lacks the GPT-2 weight h.1.ln_2.bias; is it a GPT-2 checkpoint?"


def test_a_tensor_of_the_wrong_shape_is_named_with_its_shape(tiny_dir, tmp_path):
    def swap(h):  # [64, 192] read as [192, 64]: same bytes, wrong shape
        h["transformer.h.0.attn.c_attn.weight"]["shape"] = [192, 64]

    folder = checkpoint_with_header(tiny_dir, tmp_path / "m", swap)
    line = model_error_line(generate(folder))
    assert "says n_embd 64 but" in line and "transformer.h.0.attn.c_attn.weight [192, 64]" in line


def test_a_tensor_stored_twice_under_both_names_is_refused(tiny_dir, tmp_path):
    folder = checkpoint_with_header(tiny_dir, tmp_path / "m", lambda h: h.update({"ln_f.bias": h["transformer.ln_f.bias"]}))
    message = refused(lambda: load(folder))
    assert "has both transformer.ln_f.bias and ln_f.bias" in message


def test_names_without_the_transformer_prefix_load_and_extra_buffers_are_ignored(tiny_dir, tmp_path):
    def rename(h):
        for name in [n for n in h if n.startswith("transformer.")]:
            h[name.removeprefix("transformer.")] = h.pop(name)
        h["h.0.attn.masked_bias"] = {**h["ln_f.bias"], "shape": [8, 8], "data_offsets": [0, 256]}  # old checkpoints' buffers

    folder = checkpoint_with_header(tiny_dir, tmp_path / "m", rename)
    model, _, _ = load(folder)
    reference, _, _ = load(tiny_dir)
    assert torch.equal(model.head, reference.head) and torch.equal(model.ln_f[1], reference.ln_f[1])


# --- tokenizer files -------------------------------------------------------------


def test_tokenizer_with_ids_beyond_vocab_size_is_refused(tiny_dir, good_config, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "vocab_size": 50000, "eos_token_id": 0})
    message = refused(lambda: load_tokenizer(str(folder)))
    assert message == (
        f"the tokenizer in {folder} has token ids up to 50256, but {folder}/config.json says vocab_size 50000; "
        "the tokenizer and config.json do not belong together"
    )


def test_a_larger_vocab_than_the_tokenizer_uses_is_accepted(tiny_dir, good_config, tmp_path):
    """Padded vocabularies (50304 for 50257 tokens) are common: ids must fit, not match."""
    folder = checkpoint_with(tiny_dir, tmp_path / "m", {**good_config, "vocab_size": 50304})
    info, tokenizer = load_tokenizer(str(folder))
    assert info.vocab_size == 50304 and tokenizer.id_limit == 50257


def test_vocab_and_merges_give_the_same_tokens_as_tokenizer_json(tiny_dir, tmp_path):
    if not (tiny_dir / "vocab.json").is_file():
        pytest.skip("this checkpoint's tokenizer has no vocab.json and merges.txt")
    from tokenizers import Tokenizer

    folder = checkpoint_with(tiny_dir, tmp_path / "m", skip=("tokenizer.json",))
    _, tokenizer = load_tokenizer(str(folder))
    reference = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    text = SAMPLE_TEXT + " <|endoftext|> tail"
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_id == reference.token_to_id("<|endoftext|>")


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("tokenizer.json", b'{"version": "1.0", "model": ', "cannot read the tokenizer {folder}/tokenizer.json: "),
        ("tokenizer.json", b"\xff\xfe\x00{", "{folder}/tokenizer.json is not UTF-8 text"),
        ("tokenizer.json", b"[]", "cannot read the tokenizer {folder}/tokenizer.json: "),
        ("vocab.json", b'["a", "b"]', "{folder}/vocab.json is not a vocabulary"),
        ("vocab.json", b'{"a": -1}', "{folder}/vocab.json is not a vocabulary"),
        ("vocab.json", b'{"a": 0', "{folder}/vocab.json is not valid JSON"),
        ("merges.txt", "#version: 0.2\nĠ t\nĠ t h e\n".encode(), "{folder}/merges.txt: line 3 is not a merge"),
        ("merges.txt", b"q z\n", "cannot read the tokenizer in {folder} (vocab.json, merges.txt): "),
    ],
)
def test_broken_tokenizer_file_is_one_line_naming_it(tiny_dir, tmp_path, name, content, said):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", skip=(name,) if name == "tokenizer.json" else ("tokenizer.json", name))
    if name != "tokenizer.json" and not (tiny_dir / "vocab.json").is_file():
        (folder / ("merges.txt" if name == "vocab.json" else "vocab.json")).write_text(
            "#version: 0.2\n" if name == "vocab.json" else '{"a": 0}'
        )
    (folder / name).write_bytes(content)
    assert refused(lambda: load_tokenizer(str(folder))).startswith(said.format(folder=folder))


def test_oversized_tokenizer_file_is_refused(tiny_dir, tmp_path, monkeypatch):
    import wmgen.tokens

    monkeypatch.setattr(wmgen.tokens, "TOKENIZER_LIMIT", 1 << 20)
    folder = checkpoint_with(tiny_dir, tmp_path / "m")
    size = (folder / "tokenizer.json").stat().st_size
    assert refused(lambda: load_tokenizer(str(folder))) == (
        f"{folder}/tokenizer.json is larger than 1 MiB ({size} bytes), more than wmgen reads from such a file; put the checkpoint's own file there"
    )


def test_a_folder_where_a_file_should_be_is_named(tiny_dir, tmp_path):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", skip=("tokenizer.json",))
    (folder / "tokenizer.json").mkdir()
    assert refused(lambda: load_tokenizer(str(folder))) == (
        f"{folder}/tokenizer.json is a folder, not a regular file; put the checkpoint's own file there"
    )


# --- FIFOs where files should be: one line, no hang --------------------------------


def run_wmgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wmgen", *args], capture_output=True, text=True, timeout=60, env=os.environ.copy()
    )


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_named_without_hanging(tiny_dir, tmp_path, name):
    folder = checkpoint_with(tiny_dir, tmp_path / "m", skip=(name,))
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    proc = run_wmgen("generate", "-m", str(folder), "-n", "2", "hi")  # a hang fails with TimeoutExpired
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"wmgen: error: {folder}/{name} is a named pipe (FIFO), not a regular file; put the checkpoint's own file there"
    ]

