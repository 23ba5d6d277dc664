"""--dtype int4: 4-bit weights in groups of 32 inputs (`_weight_int4pack_mm_for_cpu`),
float32 activations rounded to bfloat16 at each matrix.

Like int8, int4 is approximate by design: references are the float32 model on the
same checkpoint, through bounds set by measuring and leaving margin, and each bound
says what it was measured at. What must stay exact is the working memory: an
eviction's recompute is a fresh int4 pass over the window, and a step's rows never
depend on the rows beside them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_rows_match_alone, build_checkpoint, fresh_logits, kl, ok, one_line_error, text_ids
from reference import reference_windows
from wmgen.cli import app
from wmgen.formats import Int4, Int4Linear, Int4Weight
from wmgen.memory import WorkingMemory

if not Int4Linear.kernels():
    pytest.skip("this torch has no _weight_int4pack_mm_for_cpu, so --dtype int4 cannot run here", allow_module_level=True)

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def int4_model(tiny_dir):
    from wmgen.model import load_model, load_tokenizer

    return load_model(load_tokenizer(str(tiny_dir))[0], device="cpu", dtype="int4")


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# --- Int4Weight and Int4Linear ---------------------------------------------------------


def test_int4_weights_round_trip_each_group_to_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 96, generator=g) * torch.tensor([1.0, 1e-6, 50.0, 1.0, 3.0])[:, None]
    w[3] = 0.0  # a row of zeros
    w[4, 17] = 400.0  # one outlier sets its group's step, not its row's
    q = Int4Weight.quantize(w, 32)
    assert q.nibbles.dtype == torch.uint8 and q.nibbles.shape == (5, 48) and q.shape == (5, 96)
    assert q.scale.shape == q.zero.shape == (5, 3)
    values = q.values()
    assert int(values.min()) >= 0 and int(values.max()) <= 15
    back = q.dequantize()
    step = q.scale.float().repeat_interleave(32, 1)
    # Half a step, plus the rounding of the bfloat16 zero point (measured: under 0.01 of a step)
    assert ((back - w).abs() <= step * 0.51 + 1e-6).all(), float(((back - w).abs() / step).max())
    assert torch.equal(back[3], torch.zeros(96))
    ranges = w.reshape(5, 3, 32).amax(-1) - w.reshape(5, 3, 32).amin(-1)
    assert torch.allclose(q.scale.float(), ranges / 15, rtol=1e-2, atol=1e-30), "each group spans its own range"
    outlier_group = (w[4, 32:] - back[4, 32:]).abs().max()
    assert outlier_group < 0.1 * 400 / 15, "an outlier in one group must not coarsen the row's other groups"


def test_int4_rows_read_back_are_the_rows_dequantized():
    g = torch.Generator().manual_seed(1)
    q = Int4Weight.quantize(torch.randn(40, 64, generator=g), 32)
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(q.dequantize(ids), q.dequantize()[ids])


@pytest.mark.parametrize("outputs", [48, 50])  # 50 is padded to the kernel's 16-channel tiles
def test_int4_linear_is_x_at_the_dequantized_w_plus_b_to_bfloat16_accuracy(outputs):
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(256, outputs, generator=g), torch.randn(outputs, generator=g)  # [in, out], as GPT-2 stores it
    x = torch.randn(8, 256, generator=g)
    q = Int4Weight.quantize(weight.t(), 32)
    linear = Int4Linear(q, bias)
    got = linear(x)
    assert got.shape == (8, outputs) and got.dtype == torch.float32
    dequantized = x @ q.dequantize().t() + bias
    relative = float((got - dequantized).norm() / dequantized.norm())
    # Measured 2.4-2.6e-3: activations and outputs rounded to bfloat16. A dropped bias
    # or a wrong zero point gives > 5%.
    assert relative < 1e-2, f"relative error {relative:.4f}"
    exact = x @ weight + bias
    quantization = float((got - exact).norm() / exact.norm())
    assert 0.02 < quantization < 0.15, f"4-bit error {quantization:.3f}: measured ~0.08 for Gaussian weights"


def test_int4_rows_never_affect_each_other():
    g = torch.Generator().manual_seed(3)
    linear = Int4Linear(Int4Weight.quantize(torch.randn(64, 128, generator=g), 32), None)
    x = torch.randn(6, 128, generator=g) * torch.tensor([1.0, 100.0, 1e-3, 1.0, 5.0, 1.0])[:, None]
    together = linear(x)
    for r in range(6):
        assert torch.equal(linear(x[r : r + 1])[0], together[r])


# --- the int4 model against the float32 one --------------------------------------------


def test_int4_next_token_distributions_are_close_to_float32_and_further_than_int8(loaded, int4_model, int8_model):
    model, tokenizer, _ = loaded
    ids = text_ids(tokenizer, model.config.n_positions)
    exact = fresh_logits(model, ids)
    four, eight = kl(exact, fresh_logits(int4_model, ids)), kl(exact, fresh_logits(int8_model, ids))
    # Measured on this random checkpoint: mean 6.3e-3, max 1.6e-2 nats (int8: 3.3e-4).
    # A wrong zero point or a transposed matrix gives whole nats.
    assert float(four.mean()) < 3e-2 and float(four.max()) < 8e-2, (float(four.mean()), float(four.max()))
    assert float(four.mean()) > float(eight.mean()), "4 bits should lose more than 8"


def test_int4_token_embeddings_are_the_heads_own_rows(loaded, int4_model):
    model, _, _ = loaded
    ids = torch.tensor(random_ids(100, model.config.vocab_size, seed=2))
    approx, exact = int4_model.embed(ids), model.embed(ids)
    head = int4_model._head(torch.eye(model.config.n_embd)).t()  # [V, E]: the head's matrix as the kernel multiplies it
    torch.testing.assert_close(approx, head[ids], atol=0.02 * float(exact.abs().max()), rtol=0.0)
    assert not torch.equal(approx, exact)


def test_int4_weights_take_an_eighth_of_the_bytes_in_the_blocks(loaded, int4_model, int8_model):
    model, _, _ = loaded

    def projections(m) -> list[int]:
        return [p.nbytes for b in m.blocks for p in (b.c_attn, b.c_proj, b.c_fc, b.mlp_proj)]

    # 4 bits (1/8), a bfloat16 scale and zero per 32 weights (+1/32), a float32 bias per output channel
    for exact, approx, eight in zip(projections(model), projections(int4_model), projections(int8_model)):
        assert approx < 0.2 * exact and approx < 0.65 * eight, (approx, exact, eight)
    assert int4_model.nbytes < int8_model.nbytes, (int4_model.nbytes, int8_model.nbytes)
    assert int4_model.dtype == torch.float32 and int4_model.head is None


def test_int4_batched_rows_each_get_what_they_get_alone(loaded, int4_model):
    assert_rows_match_alone(int4_model, loaded[1])


@pytest.mark.parametrize("evict", [1, 4])
def test_int4_recompute_after_an_eviction_is_a_fresh_int4_pass_over_the_window(int4_model, evict):
    capacity = 16
    vocab = int4_model.config.vocab_size
    prompt, tokens = random_ids(7, vocab, seed=3), random_ids(40, vocab, seed=4)
    windows = reference_windows(prompt + tokens, capacity, 0, evict)[len(prompt) :]
    memory = WorkingMemory(int4_model, capacity, keep=0, evict=evict)
    memory.read(prompt)
    checked = 0
    for step, token in enumerate(tokens):
        full_before = len(windows[step - 1] if step else prompt) == capacity
        logits = memory.append(token)
        assert memory.tokens == windows[step], f"step {step}"
        if full_before:
            checked += 1
            torch.testing.assert_close(logits, fresh_logits(int4_model, windows[step])[-1], atol=1e-4, rtol=1e-4)
    assert checked >= 3


# --- the command line -------------------------------------------------------------------


def test_int4_greedy_generation_is_the_argmax_of_the_int4_model_and_repeats(tiny_dir, int4_model, tok):
    prompt = "The lighthouse keeper climbed the stairs"
    args = ["generate", "-m", str(tiny_dir), "--dtype", "int4", "-n", "10", "-t", "0", "--no-save", "--format", "jsonl", prompt]
    first = ok(runner.invoke(app, args))
    events = [json.loads(line) for line in first.splitlines()]
    assert events[0]["settings"]["model"]["dtype"] == "int4"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    store, expected = int4_model.new_store(len(ids) + 10), []
    with torch.inference_mode():
        hidden = int4_model.forward(torch.tensor([ids]), 0, store)
        for _ in range(10):
            token = int(int4_model.logits(hidden[0, -1:])[0].argmax())
            if token == int4_model.config.eos_token_id:
                break
            expected.append(token)
            hidden = int4_model.forward(torch.tensor([[token]]), len(ids) + len(expected) - 1, store)
    assert [e["id"] for e in events if e["type"] == "token"] == expected
    again = [json.loads(line) for line in ok(runner.invoke(app, args)).splitlines()]
    assert [e for e in again if e["type"] == "token"] == [e for e in events if e["type"] == "token"]


def test_int4_stats_name_the_format_and_its_kernel(tiny_dir):
    result = runner.invoke(app, ["generate", "hi", "-m", str(tiny_dir), "--dtype", "int4", "-n", "2", "--no-save", "--stats", "--debug"])
    ok(result)
    assert "int4" in result.stderr, result.stderr


def test_int4_on_cuda_is_a_one_line_usage_error(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--dtype", "int4", "--device", "cuda", "--no-save"])
    line = one_line_error(result, 2)
    assert "int4" in line and "--device cpu" in line, line


def test_int4_without_its_kernel_is_a_one_line_usage_error(tiny_dir, monkeypatch):
    monkeypatch.setattr(Int4Linear, "kernels", staticmethod(lambda: ()))
    line = one_line_error(runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--dtype", "int4", "--no-save"]), 2)
    assert "4-bit kernel" in line and "--dtype float32" in line, line


def test_int4_on_a_width_that_is_not_a_multiple_of_its_group_says_to_use_int8(tmp_path):
    folder = tmp_path / "odd"
    build_checkpoint(folder, n_embd=48, n_head=4)  # 48 is not a multiple of 32
    result = subprocess.run([sys.executable, "-m", "wmgen", "generate", "hi", "-m", str(folder), "--dtype", "int4", "--no-save"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"groups of {Int4.GROUP}" in result.stderr and "--dtype int8" in result.stderr, result.stderr
