"""wmgen perplexity: scoring text through WorkingMemory, checked against transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import WIKITEXT, build_checkpoint
from wmgen.cli import app
from wmgen.memory import WorkingMemory
from wmgen.perplexity import looks_untrained, score, token_logprobs

needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_file(), reason="WikiText-2 is not here (../shared/data is absent)")


def text_ids(tokenizer, n: int) -> list[int]:
    """`n` tokens of real text: WikiText-2 when present, else a repeated sample."""
    if WIKITEXT.is_file():
        text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    else:
        from conftest import SAMPLE_TEXT

        text = SAMPLE_TEXT * 40
    ids = tokenizer.encode(text)
    assert len(ids) >= n
    return ids[:n]


def hf_strided_token_nll(hf_model, ids: list[int], max_length: int, stride: int) -> dict[int, float]:
    """The strided sliding window of the Hugging Face guide "Perplexity of fixed-length
    models", keeping each scored token's negative log-likelihood: {position: nll}."""
    seq = torch.tensor([ids])
    seq_len = seq.size(1)
    out: dict[int, float] = {}
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = seq[:, begin:end]
        with torch.no_grad():
            logits = hf_model(window).logits[0]
        logprobs = logits.log_softmax(-1)
        for j in range(max(1, window.size(1) - trg_len), window.size(1)):  # the window's targets
            out[begin + j] = -float(logprobs[j - 1, window[0, j]])
        prev_end = end
        if end == seq_len:
            break
    return out


def hf_guide_perplexity(hf_model, ids: list[int], max_length: int, stride: int) -> float:
    """The guide's loop as written: per-window mean loss, weighted by its count."""
    seq = torch.tensor([ids])
    seq_len = seq.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # the labels the loss averaged
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("max_length, stride", [(64, 32), (64, 16), (48, 47), (33, 1)])
def test_memory_scores_the_same_tokens_with_the_same_contexts_as_the_strided_window(loaded, hf_model, max_length, stride):
    model, tokenizer, _ = loaded
    ids = text_ids(tokenizer, 200 if stride > 1 else 90)
    memory = WorkingMemory(model, capacity=max_length - 1, keep=0, evict=stride)
    ours = token_logprobs(memory, ids)
    reference = hf_strided_token_nll(hf_model, ids, max_length, stride)
    assert sorted(reference) == list(range(1, len(ids))), "the reference scores every token but the first"
    expected = torch.tensor([-reference[i] for i in range(1, len(ids))])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_length, stride", [(64, 32), (64, 16)])
def test_perplexity_agrees_with_the_strided_window_method(loaded, hf_model, max_length, stride):
    model, tokenizer, _ = loaded
    ids = text_ids(tokenizer, 300)
    result = score(WorkingMemory(model, max_length - 1, 0, stride), ids, tokenizer.token_bytes)
    reference = hf_guide_perplexity(hf_model, ids, max_length, stride)
    assert result.tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(reference, rel=1e-5)


def test_scoring_inside_capacity_equals_one_plain_forward(loaded, hf_model):
    model, tokenizer, info = loaded
    ids = text_ids(tokenizer, info.n_positions)
    result = score(WorkingMemory(model, info.n_positions, 0, 16), ids, tokenizer.token_bytes)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert result.evictions == 0
    assert result.nll == pytest.approx(float(nll), rel=1e-5)


def test_evict_1_gives_every_token_exactly_capacity_tokens_of_context(loaded, hf_model):
    model, tokenizer, _ = loaded
    capacity = 20
    ids = text_ids(tokenizer, 60)
    ours = token_logprobs(WorkingMemory(model, capacity, 0, 1), ids)
    for x in range(capacity + 1, len(ids)):  # once the memory is full
        context = ids[x - capacity : x]  # exactly the `capacity` tokens before x
        with torch.no_grad():
            expected = hf_model(torch.tensor([context])).logits[0, -1].log_softmax(-1)[ids[x]]
        assert float(ours[x - 1]) == pytest.approx(float(expected), abs=1e-4), f"token {x}"


def test_bits_per_byte_counts_the_bytes_of_the_scored_text(loaded):
    model, tokenizer, _ = loaded
    text = "Ünïcödé and emoji 🌊 count as bytes, not characters."
    ids = tokenizer.encode(text)
    result = score(WorkingMemory(model, 64, 0, 16), ids, tokenizer.token_bytes)
    scored_text_bytes = len(text.encode()) - len(tokenizer.token_bytes(ids[0]))
    assert result.bytes == scored_text_bytes
    assert result.bits_per_byte == pytest.approx(result.nll_sum / math.log(2) / scored_text_bytes)


def test_a_near_uniform_model_is_called_untrained():
    assert looks_untrained(50000.0, 50257)
    assert not looks_untrained(30.0, 50257)


# --- the command -----------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def text_file(tmp_path, loaded):
    _, tokenizer, _ = loaded
    path = tmp_path / "text.txt"
    path.write_text(tokenizer.decode(text_ids(tokenizer, 150)), encoding="utf-8")
    return path


def test_json_output_has_the_documented_fields(tiny_dir, text_file):
    r = runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--capacity", "32", "--evict", "8", "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("tokens", "nll", "perplexity", "bits_per_byte", "capacity", "keep", "evict", "evictions",
                "recomputed", "recompute_share", "seconds", "tokens_per_s", "model", "file"):
        assert key in data, key
    assert data["capacity"] == 32 and data["evict"] == 8
    assert data["perplexity"] == pytest.approx(math.exp(data["nll"]))
    assert data["evictions"] > 0


def test_max_tokens_scores_a_prefix(tiny_dir, text_file):
    r = runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--max-tokens", "40", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 39


def test_stdin_text_is_scored_like_the_file(tiny_dir, text_file):
    args = ["-m", str(tiny_dir), "--json", "--capacity", "32"]
    from_file = json.loads(runner.invoke(app, ["perplexity", str(text_file), *args]).stdout)
    r = runner.invoke(app, ["perplexity", "-", *args], input=text_file.read_bytes())
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["nll"] == pytest.approx(from_file["nll"])


def test_sweep_prints_one_row_per_valid_shape(tiny_dir, text_file):
    r = runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--json",
                            "--sweep", "capacity=16,32", "evict=1,8"])
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["capacity"], row["evict"]) for row in rows] == [(16, 1), (16, 8), (32, 1), (32, 8)]
    table = runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--sweep", "capacity=16,32"])
    assert table.exit_code == 0
    assert len([line for line in table.stdout.splitlines() if line.startswith(("| oldest | 16 |", "| oldest | 32 |"))]) == 2


def test_sweep_plot_writes_a_png(tiny_dir, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.png"
    r = runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--sweep", "evict=4,16", "--plot", str(out)])
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_untrained_model_is_flagged_on_stderr(tiny_dir, text_file, tmp_path):
    flat = tmp_path / "flat"
    model = build_checkpoint(flat)
    with torch.no_grad():  # all-zero weights: every next token equally likely
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(flat)
    r = runner.invoke(app, ["perplexity", str(text_file), "-m", str(flat)])
    assert r.exit_code == 0, r.stderr
    assert "looks untrained" in r.stderr
    assert "looks untrained" not in r.stdout


@pytest.mark.parametrize(
    "setup, args, words",
    [
        ("missing", ["nope.txt"], ["nope.txt"]),
        ("empty", ["empty.txt"], ["empty"]),
        ("binary", ["binary.bin"], ["binary"]),
        ("latin1", ["latin1.txt"], ["utf-8"]),
        ("one-token", ["one.txt"], ["at least 2"]),
        ("bad-sweep", ["ok.txt", "--sweep", "size=1,2"], ["sweep"]),
        ("plot-without-sweep", ["ok.txt", "--plot", "x.png"], ["--sweep"]),
        ("keep-prompt", ["ok.txt", "--keep", "4", "--capacity", "4"], ["keep"]),
    ],
)
def test_bad_input_is_one_line_with_exit_2(tiny_dir, tmp_path, monkeypatch, setup, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "ok.txt").write_text("The lighthouse keeper climbed the stairs.")
    r = runner.invoke(app, ["perplexity", *args, "-m", str(tiny_dir)])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w.lower() in lines[0].lower() for w in words), lines[0]


@needs_wikitext
def test_progress_never_reaches_stdout(tiny_dir):
    """Real pipes: stdout is only the result (the bar goes to stderr, and only on a terminal)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wmgen", "perplexity", str(WIKITEXT), "-m", str(tiny_dir), "--max-tokens", "300", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert data["tokens"] == 299
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
