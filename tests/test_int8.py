"""--dtype int8: int8 weights (by fbgemm, oneDNN or int8pack kernels), float32 activations and keys/values.

int8 is approximate by design, so most references here are the float32 model on the
same checkpoint, compared through bounds set by measuring and leaving margin (each
bound says what it was measured at). What must stay exact is the working memory: an
eviction's recompute is a fresh int8 pass over the window.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT, assert_int8_close, assert_rows_match_alone, fresh_logits, kl, ok, one_line_error, text_ids
from reference import reference_windows
from wmgen.cli import app
from wmgen.formats import Int8Linear, int8_available, quantize_rows
from wmgen.memory import WorkingMemory

if not int8_available():
    pytest.skip("this torch has none of the int8 kernels (fbgemm, oneDNN, int8pack), so --dtype int8 cannot run here", allow_module_level=True)

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def fresh_last_logits(model, window: list[int]) -> torch.Tensor:
    """Logits `[V]` for the token after `window`, from one forward pass over it."""
    hidden = model.forward(torch.tensor([window]), 0, model.new_store(len(window)))
    return model.logits(hidden[0, -1:])[0].float()


# --- quantize_rows and Int8Linear ----------------------------------------------------


def test_quantize_rows_round_trips_each_row_to_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 300, generator=g) * torch.tensor([1.0, 1e-6, 50.0, 1.0, 3.0, 1.0])[:, None]
    w[3] = 0.0  # a row of zeros
    w[4, 17] = 400.0  # one outlier sets its row's step
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape == (6,) and scale.dtype == torch.float32
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.isfinite(scale).all() and (scale > 0).all()
    back = q.float() * scale[:, None]
    assert torch.isfinite(back).all()
    error = (back - w).abs().amax(1)
    assert (error <= scale / 2 * (1 + 1e-5)).all(), f"errors {error.tolist()} vs half steps {(scale / 2).tolist()}"
    assert torch.equal(back[3], torch.zeros(300)) and torch.equal(q[3], torch.zeros(300, dtype=torch.int8))
    nonzero = [0, 1, 2, 4, 5]
    assert (q[nonzero].abs().amax(1) == 127).all(), "each row's largest weight should use the full int8 range"


def test_quantize_rows_reads_a_transposed_view_as_its_row_major_copy():
    g = torch.Generator().manual_seed(2)
    stored = torch.randn(300, 70, generator=g) * torch.linspace(0.01, 5.0, 70)  # [in, out], as GPT-2 stores it
    q, scale = quantize_rows(stored.t())
    q_copy, scale_copy = quantize_rows(stored.t().contiguous())
    assert q.is_contiguous() and q.shape == (70, 300)
    assert torch.equal(q, q_copy) and torch.equal(scale, scale_copy)


def test_int8_linear_is_x_at_w_plus_b_to_int8_accuracy():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(256, 1024, generator=g), torch.randn(1024, generator=g)  # [in, out], as GPT-2 stores it
    x = torch.randn(8, 256, generator=g)
    expected = x @ weight + bias
    got = Int8Linear.from_weight(weight, bias)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    relative = float((got - expected).norm() / expected.norm())
    # Measured 1.3-1.8% over seeds and shapes (in 64..256): activations are quantized to
    # 7 bits per tensor (~1.4% of a Gaussian's spread), weights to 8 bits per row (~0.8%).
    # 3% leaves ~1.7x margin; a dropped bias gives ~12%, a transposed weight ~140%.
    assert relative < 0.03, f"relative error {relative:.4f}"
    assert relative > 1e-4, "no quantization error at all: the int8 kernel did not run"


# --- the int8 model against the float32 one --------------------------------------------


def test_int8_next_token_distributions_are_close_to_float32_but_not_identical(loaded, int8_model):
    model, tokenizer, _ = loaded
    ids = text_ids(tokenizer, model.config.n_positions)
    exact, approx = fresh_logits(model, ids), fresh_logits(int8_model, ids)
    # (The checkpoint's biases are zero, as transformers initialises them: biases are
    # checked by the Int8Linear test.)
    assert_int8_close(exact, approx)


def test_int8_token_embeddings_are_the_float32_rows_to_within_half_a_step(loaded, int8_model):
    model, _, _ = loaded
    ids = torch.tensor(random_ids(200, model.config.vocab_size, seed=2))
    exact, approx = model.embed(ids), int8_model.embed(ids)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    half_step = exact.abs().amax(1) / 127 / 2
    assert ((approx - exact).abs().amax(1) <= half_step * (1 + 1e-5)).all()
    assert not torch.equal(approx, exact)


def test_int8_weights_take_a_quarter_of_the_bytes_in_the_blocks(loaded, int8_model):
    model, _, _ = loaded

    def projections(m) -> list[int]:
        return [p.nbytes for b in m.blocks for p in (b.c_attn, b.c_proj, b.c_fc, b.mlp_proj)]

    # int8 weights (1/4) plus a float32 scale and bias per output channel: 0.26-0.28 measured at n_embd 64
    for exact, approx in zip(projections(model), projections(int8_model)):
        assert approx < 0.3 * exact, (approx, exact)
    # This checkpoint is mostly its vocab x 64 tied matrix, which int8 keeps twice (the
    # head, packed by fbgemm, and the embedding rows): half its float32 bytes. Measured
    # 0.54 (0.35 with the 400-token fallback tokenizer; 0.33 on a gpt2-shaped model).
    assert int8_model.nbytes < 0.6 * model.nbytes, (int8_model.nbytes, model.nbytes)
    assert int8_model.dtype == torch.float32, "activations stay float32"


@pytest.mark.parametrize("native_bfloat16", [False, True])
def test_int8_keys_and_values_are_bfloat16_where_the_cpu_has_it_and_it_measures_faster_and_stay_within_the_int8_bounds(
    tiny_dir, loaded, monkeypatch, native_bfloat16
):
    from wmgen import model as loader
    from wmgen.model import load_model, load_tokenizer

    monkeypatch.setattr(loader, "KV_BFLOAT16", native_bfloat16)
    monkeypatch.setattr(loader, "_store_dtype", lambda shape, cache: "bfloat16")  # as where it measures faster
    model, tokenizer, _ = loaded
    int8_model = load_model(load_tokenizer(str(tiny_dir))[0], device="cpu", dtype="int8")
    store = int8_model.new_store(8)
    assert store.keys.dtype == store.values.dtype == (torch.bfloat16 if native_bfloat16 else torch.float32)
    assert model.new_store(8).keys.dtype == torch.float32, "float32 keeps float32 keys and values"
    ids = text_ids(tokenizer, model.config.n_positions)
    assert_int8_close(fresh_logits(model, ids), fresh_logits(int8_model, ids))
    assert_rows_match_alone(int8_model, tokenizer)
    result = runner.invoke(app, ["generate", "hi", "-m", str(tiny_dir), "--dtype", "int8", "-n", "2", "--no-save", "--stats", "--debug"])
    ok(result)
    assert f"keys and values {'bfloat16' if native_bfloat16 else 'float32'}" in result.stderr, result.stderr


# --- working memory in int8 -----------------------------------------------------------------


@pytest.mark.parametrize("evict", [1, 4, 7])
def test_int8_recompute_after_an_eviction_is_a_fresh_int8_pass_over_the_window(int8_model, evict):
    capacity = 16
    vocab = int8_model.config.vocab_size
    prompt, tokens = random_ids(7, vocab, seed=3), random_ids(45, vocab, seed=4)
    windows = reference_windows(prompt + tokens, capacity, 0, evict)[len(prompt) :]
    memory = WorkingMemory(int8_model, capacity, keep=0, evict=evict)
    logits, _ = memory.read(prompt)
    torch.testing.assert_close(logits, fresh_last_logits(int8_model, prompt), atol=1e-4, rtol=1e-4)
    recomputes = 0
    for step, token in enumerate(tokens):
        full_before = len(windows[step - 1] if step else prompt) == capacity
        logits = memory.append(token)
        assert memory.tokens == windows[step], f"step {step}"
        if full_before:  # keep=0: the whole window is read again in one pass, as a fresh pass reads it
            recomputes += 1
            expected = fresh_last_logits(int8_model, windows[step])
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")
    assert recomputes >= 3 and memory.counters.evictions == recomputes


@pytest.mark.parametrize("keep, evict", [(0, 4), (3, 5)])
def test_int8_steps_between_evictions_stay_within_quantization_noise_of_a_fresh_pass(int8_model, keep, evict):
    """An incremental step quantizes one token's activations on its own; a fresh pass
    quantizes the whole window's together. So they differ, but only by int8 noise."""
    capacity = 16
    vocab = int8_model.config.vocab_size
    prompt, tokens = random_ids(7, vocab, seed=5), random_ids(45, vocab, seed=6)
    windows = reference_windows(prompt + tokens, capacity, keep, evict)[len(prompt) :]
    memory = WorkingMemory(int8_model, capacity, keep=keep, evict=evict)
    memory.read(prompt)
    steps = torch.stack([memory.append(token) for token in tokens])
    assert memory.tokens == windows[-1]
    assert memory.counters.evictions >= 3
    expected = torch.stack([fresh_last_logits(int8_model, w) for w in windows])
    divergence = kl(expected, steps)
    # Measured: mean 2.1-2.9e-4, max 5.0-5.7e-4 nats, the size of int8-vs-float32 noise.
    # Stale keys and values (not recomputed after an eviction) give mean 1.6-2.7e-2, max 4-8e-2.
    assert float(divergence.mean()) < 2e-3, f"mean KL {float(divergence.mean()):.2e}"
    assert float(divergence.max()) < 5e-3, f"max KL {float(divergence.max()):.2e}"


# --- the command line -----------------------------------------------------------------


def greedy_reference(model, prompt: list[int], n: int, eos: int | None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities with the model's own key/value store:
    the prompt in one pass, then one token per step (no eviction: it all fits)."""
    store = model.new_store(len(prompt) + n)
    tokens, logprobs = [], []
    with torch.inference_mode():
        hidden = model.forward(torch.tensor([prompt]), 0, store)
        for _ in range(n):
            logits = model.logits(hidden[0, -1:])[0].float().log_softmax(-1)
            token = int(logits.argmax())
            if token == eos:
                break
            tokens.append(token)
            logprobs.append(float(logits[token]))
            hidden = model.forward(torch.tensor([[token]]), len(prompt) + len(tokens) - 1, store)
    return tokens, logprobs


def test_int8_greedy_generation_prints_text_and_repeats_itself(tiny_dir):
    args = ["generate", "-m", str(tiny_dir), "--dtype", "int8", "-n", "8", "-t", "0", "--no-save", "hello"]
    first = runner.invoke(app, args)
    assert ok(first).strip(), "no text printed"
    assert first.stderr == ""
    assert ok(runner.invoke(app, args)) == first.stdout


def test_int8_greedy_tokens_are_the_argmax_of_the_int8_model(tiny_dir, int8_model, tok):
    prompt = "The lighthouse keeper climbed the stairs"
    args = ["generate", "-m", str(tiny_dir), "--dtype", "int8", "-n", "12", "-t", "0", "--no-save", "--format", "jsonl", prompt]
    events = [json.loads(line) for line in ok(runner.invoke(app, args)).splitlines()]
    assert events[0]["type"] == "start" and events[0]["settings"]["model"]["dtype"] == "int8"
    tokens = [e for e in events if e["type"] == "token"]
    ids, logprobs = greedy_reference(int8_model, tok.encode(prompt, add_special_tokens=False).ids, 12, int8_model.config.eos_token_id)
    assert [e["id"] for e in tokens] == ids
    # int8 and float32 log-probabilities differ by ~0.1: these are the int8 model's own
    assert [e["logprob"] for e in tokens] == pytest.approx(logprobs, abs=1e-4)
    assert events[-1]["generated"] == len(ids)


def test_int8_runs_where_torch_has_no_quantized_engines_through_int8pack(tiny_dir, tok, monkeypatch):
    from wmgen.model import load_model, load_tokenizer

    if "int8pack" not in Int8Linear.kernels():
        pytest.skip("this torch has no _weight_int8pack_mm")
    monkeypatch.setattr(Int8Linear, "kernels", staticmethod(lambda: ("int8pack",)))  # a CPU without fbgemm or oneDNN
    prompt = "The lighthouse keeper climbed the stairs"
    args = ["generate", "-m", str(tiny_dir), "--dtype", "int8", "-n", "8", "-t", "0", "--no-save", "--format", "jsonl", prompt]
    tokens = [e for e in map(json.loads, ok(runner.invoke(app, args)).splitlines()) if e["type"] == "token"]
    model = load_model(load_tokenizer(str(tiny_dir))[0], device="cpu", dtype="int8")
    assert {b.c_fc.kernel for b in model.blocks} == {"int8pack"} and model._head.kernel == "int8pack"
    ids, logprobs = greedy_reference(model, tok.encode(prompt, add_special_tokens=False).ids, 8, model.config.eos_token_id)
    assert [e["id"] for e in tokens] == ids
    assert [e["logprob"] for e in tokens] == pytest.approx(logprobs, abs=1e-4)


def test_without_any_int8_kernel_int8_is_a_one_line_usage_error(tiny_dir, monkeypatch):
    monkeypatch.setattr(Int8Linear, "kernels", staticmethod(lambda: ()))
    result = runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--dtype", "int8", "--no-save"])
    line = one_line_error(result, 2)
    assert "int8 kernels" in line and "--dtype float32" in line, line


@pytest.mark.parametrize("command", ["generate", "perplexity"])
def test_int8_on_cuda_is_a_one_line_usage_error(tiny_dir, tmp_path, command):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    what = "hello" if command == "generate" else str(text)
    result = runner.invoke(app, [command, what, "-m", str(tiny_dir), "--dtype", "int8", "--device", "cuda"])
    line = one_line_error(result, 2)
    assert line.startswith("wmgen: error:") and "cuda" in line.lower(), line


def test_int8_where_cuda_exists_says_it_runs_on_the_cpu_only(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the "no CUDA device" check
    result = runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--dtype", "int8", "--device", "cuda", "--no-save"])
    line = one_line_error(result, 2)
    assert line.startswith("wmgen: error:") and "int8" in line and "--device cpu" in line, line


def test_int8_with_the_device_left_to_auto_runs_on_the_cpu_even_where_cuda_exists(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto would otherwise pick cuda
    result = runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--dtype", "int8", "-n", "3", "-t", "0", "--no-save"])
    assert ok(result).strip()


def test_int8_on_cuda_in_a_real_process_is_one_line_without_traceback(tiny_dir):
    result = subprocess.run(
        [sys.executable, "-m", "wmgen", "generate", "-m", str(tiny_dir), "--dtype", "int8", "--device", "cuda", "--no-save", "hello"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wmgen: error:"), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["generate", "perplexity"])
def test_an_unknown_dtype_is_a_one_line_usage_error(tiny_dir, tmp_path, command):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    what = "hello" if command == "generate" else str(text)
    result = runner.invoke(app, [command, what, "-m", str(tiny_dir), "--dtype", "int7"])
    line = one_line_error(result, 2)
    assert line.startswith("wmgen: error:") and "int7" in line, line


def test_int8_perplexity_is_finite_and_close_to_float32(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    scores = {}
    for dtype in ("float32", "int8"):
        args = ["perplexity", str(text), "-m", str(tiny_dir), "--dtype", dtype, "--capacity", "32", "--evict", "8",
                "--max-tokens", "200", "--json", "-q"]
        scores[dtype] = json.loads(ok(runner.invoke(app, args)))
    exact, approx = scores["float32"], scores["int8"]
    assert approx["tokens"] == exact["tokens"] and approx["evictions"] == exact["evictions"] > 0
    assert math.isfinite(approx["perplexity"]) and approx["perplexity"] > 1
    # Measured: 0.3% apart (0.006% on WikiText); per-token KL of ~3e-4 nats allows ~1%.
    assert approx["perplexity"] == pytest.approx(exact["perplexity"], rel=0.02)
    assert approx["perplexity"] != exact["perplexity"], "int8 scored exactly like float32: nothing was quantized"
