"""Fixtures: small random GPT-2 checkpoints saved to disk, so the real loading path runs.

The tokenizer is the real GPT-2 one from ../shared/tokenizers/gpt2 when present;
otherwise a byte-level BPE trained here (tests that need the real one skip).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # read once when huggingface_hub is imported: set it before

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

needs_gpt2_tokenizer = pytest.mark.skipif(
    not (GPT2_TOKENIZER / "tokenizer.json").is_file(),
    reason="the real GPT-2 tokenizer is not here (../shared/tokenizers/gpt2 is absent)",
)

SAMPLE_TEXT = (
    "The lighthouse keeper climbed the stairs every evening. Once upon a time there was a "
    "small town by the sea, and the keeper knew every ship by name. 灯台守は毎晩階段を上った。 "
    "Emoji too: 🌊🚢🌅. def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
)


# key -> (TOML section, TOML key, Settings attribute, field); written out here, not
# taken from wmgen, so a mapping mistake in wmgen shows up as a failure.
WHERE = {
    "model": ("model", "model", "model", "name"),
    "device": ("model", "device", "model", "device"),
    "dtype": ("model", "dtype", "model", "dtype"),
    "capacity": ("memory", "capacity", "memory", "capacity"),
    "keep": ("memory", "keep", "memory", "keep"),
    "evict": ("memory", "evict", "memory", "evict"),
    "policy": ("memory", "policy", "memory", "policy"),
    "recent": ("memory", "recent", "memory", "recent"),
    "temperature": ("sampling", "temperature", "sampling", "temperature"),
    "top_k": ("sampling", "top_k", "sampling", "top_k"),
    "top_p": ("sampling", "top_p", "sampling", "top_p"),
    "repetition_penalty": ("sampling", "repetition_penalty", "sampling", "repetition_penalty"),
    "seed": ("sampling", "seed", "sampling", "seed"),
    "max_new_tokens": ("run", "max_new_tokens", "run", "max_new_tokens"),
    "stop": ("run", "stop", "run", "stop"),
    "ignore_eos": ("run", "ignore_eos", "run", "ignore_eos"),
}


def toml_value(value) -> str:
    """A value as TOML, written by hand (NaN and infinities are TOML floats too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml_for(key: str, value) -> str:
    section, name, _, _ = WHERE[key]
    return f"[{section}]\n{name} = {toml_value(value)}\n"


def env_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def write_tokenizer(folder: Path) -> None:
    """The real GPT-2 tokenizer if present, else a small byte-level BPE trained here."""
    if (GPT2_TOKENIZER / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(GPT2_TOKENIZER / name, folder / name)
        return
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))


def build_checkpoint(folder: Path, *, n_positions: int = 64, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seed: int = 0):
    """Save a random GPT-2 with a tokenizer to `folder`; return the transformers model."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random init is near-uniform; sharper weights give varied, peaky logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder)
    return model


# --- CLI result checks shared by the test files ----------------------------------


def ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}; stderr: {result.stderr!r}; exception: {result.exception!r}"
    return result.stdout


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, f"expected exit {code}, got {result.exit_code}; stderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, f"a traceback instead of a one-line error:\n{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert result.stdout == "", f"an error run wrote to stdout: {result.stdout!r}"
    return lines[0]


def read_terminal(fd: int) -> bytes:
    """Everything a pseudo-terminal's other side wrote, until it closed."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model is all overhead: one intra-op thread runs it faster in process,
    and leaves the other core to subprocesses."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok(tiny_dir):
    """The checkpoint's own tokenizer, read by the `tokenizers` library."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_checkpoint(folder)
    return folder


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """The same checkpoint loaded by transformers: the reference."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    """(GPT2, Tokenizer, ModelInfo) through wmgen's own loading path."""
    from wmgen.model import load_model, load_tokenizer

    info, tokenizer = load_tokenizer(str(tiny_dir))
    return load_model(info, device="cpu", dtype="float32"), tokenizer, info


@pytest.fixture(scope="session")
def int8_model(tiny_dir):
    """The same checkpoint loaded with --dtype int8 (skips where torch has no int8 kernels)."""
    from wmgen.formats import int8_available
    from wmgen.model import load_model, load_tokenizer

    if not int8_available():
        pytest.skip("this torch has none of the int8 kernels (fbgemm, oneDNN, int8pack), so --dtype int8 cannot run here")
    info, _ = load_tokenizer(str(tiny_dir))
    return load_model(info, device="cpu", dtype="int8")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads or writes the real user's config or sessions."""
    monkeypatch.setenv("WMGEN_HOME", str(tmp_path / "wmgen-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in list(os.environ):
        if key.startswith("WMGEN_") and key != "WMGEN_HOME":
            monkeypatch.delenv(key)


# --- model checks shared by the int8 and kernel tests -----------------------------------


def text_ids(tokenizer, n: int) -> list[int]:
    """The first `n` token ids of the sample text (repeated until long enough)."""
    ids = tokenizer.encode(SAMPLE_TEXT * 4)
    assert len(ids) >= n
    return ids[:n]


def fresh_logits(model, window: list[int]):
    """Logits `[T, V]` at every position of one forward pass over `window`, in a store of its own."""
    import torch

    with torch.inference_mode():
        hidden = model.forward(torch.tensor([window]), 0, model.new_store(len(window)))
        return model.logits(hidden[0]).float()


def kl(p_logits, q_logits):
    """KL(p || q) in nats, per row."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def assert_int8_close(exact, approx) -> None:
    """int8 logits near float32's, but not equal. Measured for fbgemm: mean KL 3.3e-4
    nats, max 5.7e-4 (the 50257-token checkpoint); mean 3.1e-4, max 7.8e-4 (the
    400-token fallback): logits move by up to ~0.15. The bounds leave >6x margin; a
    wrong embedding scale gives KL of whole nats."""
    divergence = kl(exact, approx)
    assert float(divergence.mean()) < 2e-3, f"mean KL {float(divergence.mean()):.2e}"
    assert float(divergence.max()) < 5e-3, f"max KL {float(divergence.max()):.2e}"
    # float32 runs of the same pass differ by ~1e-6; int8 moves logits by ~0.1
    assert float((exact - approx).abs().max()) > 1e-3, "int8 logits equal float32: nothing was quantized"


def assert_rows_match_alone(model, tokenizer, steps: int = 30) -> None:
    """MemoryBatch: rows with different prompts, evicting at different steps and now
    and then sitting a step out, each get exactly the logits a WorkingMemory of their
    own gets (within 1e-4), and end holding the same tokens."""
    import torch

    from wmgen.memory import MemoryBatch, WorkingMemory

    prompts = [tokenizer.encode(t) for t in ("Once", "The lighthouse keeper climbed the stairs", "def fib(n):")]
    batch = MemoryBatch(model, len(prompts), capacity=16, keep=1, evict=4)
    alone = [WorkingMemory(model, 16, 1, 4) for _ in prompts]
    got = [m.read(p)[0] for m, p in zip(batch.rows, prompts)]
    want = [m.read(p)[0] for m, p in zip(alone, prompts)]
    for step in range(steps):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        tokens = [int(w.argmax()) for w in want]
        tokens[step % 3] = None if step % 7 == 6 else tokens[step % 3]  # a row sits a step out now and then
        got = list(batch.append(tokens, [None] * len(tokens)))
        want = [m.append(t) if t is not None else w for m, t, w in zip(alone, tokens, want)]
        got = [g if t is not None else w for g, t, w in zip(got, tokens, want)]
    assert [m.tokens for m in batch.rows] == [m.tokens for m in alone]
    assert any(m.counters.evictions for m in alone), "the rows must have evicted"
