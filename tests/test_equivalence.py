"""Equivalence with transformers on the same weights (DESIGN.md, "Contracts worth keeping").

Every expected value here comes from `transformers`' own GPT-2 (`hf_model`, loaded from
the same checkpoint) run over a window of tokens the test works out itself from the full
token stream; nothing is read back from the memory under test to build an expectation.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_rows_match_alone
from reference import reference_windows
from wmgen.generation import Finished, Started, Token, generate
from wmgen.memory import WorkingMemory
from wmgen.settings import RunSettings, Sampling

ATOL, RTOL = 1e-4, 1e-4
PROMPT = "The lighthouse keeper climbed the stairs"


def hf_last_logits(hf_model, window: list[int]) -> torch.Tensor:
    """transformers' logits for the token after `window`, from a fresh forward pass."""
    with torch.no_grad():
        return hf_model(torch.tensor([window])).logits[0, -1]


def hf_all_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]


def hf_logits_after(hf_model, windows: list[list[int]]) -> torch.Tensor:
    """`hf_last_logits` for many windows in one batched pass: `[len(windows), V]`.

    Windows are padded on the right; attention is causal, so padding after a
    window's last token cannot change that token's logits."""
    longest = max(map(len, windows))
    batch = torch.tensor([w + [0] * (longest - len(w)) for w in windows])
    with torch.no_grad():
        logits = hf_model(batch).logits
    return logits[torch.arange(len(windows)), torch.tensor([len(w) - 1 for w in windows])]


def window_after(stream: list[int], capacity: int, keep: int, evict: int) -> list[int]:
    """The tokens held after reading `stream` one token at a time (the reference model)."""
    return reference_windows(stream, capacity, keep, evict)[-1]


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def assert_logits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def run_generate(memory, tokenizer, prompt, run: RunSettings, sampling: Sampling, **kwargs):
    events = list(generate(memory, tokenizer, prompt, run, sampling, **kwargs))
    tokens = [e.id for e in events if isinstance(e, Token)]
    finished = events[-1]
    assert isinstance(finished, Finished)
    return tokens, finished, events


# --- inside capacity -------------------------------------------------------------------


def test_logits_equal_transformers_at_every_step_inside_capacity(loaded, hf_model):
    model, tokenizer, _ = loaded
    capacity = model.config.n_positions
    prompt = tokenizer.encode(PROMPT)
    memory = WorkingMemory(model, capacity, keep=0, evict=1)
    logits, dropped = memory.read(prompt)
    assert dropped == 0
    steps = [logits]
    tokens = random_ids(capacity - len(prompt), model.config.vocab_size, seed=1)
    for token in tokens:
        steps.append(memory.append(token))
    stream = prompt + tokens
    # a causal model's logits at position i are those of a forward over stream[:i + 1]
    reference = hf_all_logits(hf_model, stream)
    for step, actual in enumerate(steps):
        assert_logits_equal(actual, reference[len(prompt) - 1 + step], f"step {step}")
    assert memory.fill == capacity
    assert memory.counters.evictions == 0


def test_greedy_generate_gives_the_tokens_of_transformers_generate(loaded, hf_model):
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode(PROMPT)
    n = model.config.n_positions - len(prompt)
    memory = WorkingMemory(model, model.config.n_positions)
    ours, finished, _ = run_generate(memory, tokenizer, prompt, RunSettings(max_new_tokens=n), Sampling(temperature=0))
    theirs = hf_greedy(hf_model, prompt, n, eos_token_id=tokenizer.eos_id)
    if tokenizer.eos_id in theirs:  # transformers keeps the eos token; wmgen stops before it
        cut = theirs.index(tokenizer.eos_id)
        assert ours == theirs[:cut]
        assert finished.reason == "eos"
    else:
        assert ours == theirs
        assert finished.reason == "length"
    assert finished.generated == len(ours)


def test_greedy_stops_at_eos_where_transformers_does(loaded, hf_model):
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode(PROMPT)
    n = model.config.n_positions - len(prompt)
    free_run = hf_greedy(hf_model, prompt, n, eos_token_id=None)
    # a token the model does produce greedily, a few steps in, plays end-of-text
    eos = next(t for t in free_run[3:] if t not in free_run[:3])
    theirs = hf_greedy(hf_model, prompt, n, eos_token_id=eos)
    assert theirs[-1] == eos and eos not in theirs[:-1], "transformers should stop right after the first eos"

    memory = WorkingMemory(model, model.config.n_positions)
    ours, finished, _ = run_generate(
        memory, tokenizer, prompt, RunSettings(max_new_tokens=n), Sampling(temperature=0), eos_id=eos
    )
    assert finished.reason == "eos"
    assert ours == theirs[:-1]
    assert eos not in memory.tokens, "the eos token that ends a run is not read into memory"


def test_greedy_with_ignore_eos_matches_transformers_without_eos_over_many_tokens(loaded, hf_model):
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode(PROMPT)
    n = model.config.n_positions - len(prompt)
    theirs = hf_greedy(hf_model, prompt, n, eos_token_id=None)
    eos = theirs[2]  # would end the run early, were it not ignored
    memory = WorkingMemory(model, model.config.n_positions)
    ours, finished, _ = run_generate(
        memory, tokenizer, prompt, RunSettings(max_new_tokens=n, ignore_eos=True), Sampling(temperature=0), eos_id=eos
    )
    assert finished.reason == "length"
    assert len(ours) == n
    assert ours == theirs
    assert eos in ours


def test_greedy_with_repetition_penalty_matches_transformers(loaded, hf_model):
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode(PROMPT)
    n = 24
    memory = WorkingMemory(model, model.config.n_positions)
    ours, _, _ = run_generate(
        memory,
        tokenizer,
        prompt,
        RunSettings(max_new_tokens=n, ignore_eos=True),
        Sampling(temperature=0, repetition_penalty=1.5),
    )
    theirs = hf_greedy(hf_model, prompt, n, eos_token_id=None, repetition_penalty=1.5)
    assert ours == theirs
    assert ours != hf_greedy(hf_model, prompt, n, eos_token_id=None), "the penalty should change this greedy run"


# --- past capacity: the window ---------------------------------------------------------


@pytest.mark.parametrize(
    "keep, evict",
    [(0, 1), (3, 1), (0, 4), (3, 5), (2, 14), (5, 2)],
    ids=lambda v: str(v),
)
def test_every_step_equals_a_fresh_forward_over_the_window(loaded, hf_model, keep, evict):
    model, _, _ = loaded
    capacity = 16
    vocab = model.config.vocab_size
    prompt = random_ids(7, vocab, seed=2)
    tokens = random_ids(45, vocab, seed=3)
    memory = WorkingMemory(model, capacity, keep=keep, evict=evict)
    logits, _ = memory.read(prompt)
    assert_logits_equal(logits, hf_last_logits(hf_model, prompt), "after the prompt")
    steps = [memory.append(token) for token in tokens]
    windows = [window_after(prompt + tokens[: i + 1], capacity, keep, evict) for i in range(len(tokens))]
    expected = hf_logits_after(hf_model, windows)
    for step, logits in enumerate(steps):
        assert_logits_equal(logits, expected[step], f"step {step}")
    assert memory.counters.evictions > 0, "the run should have gone past capacity"


def test_sliding_window_with_evict_1_is_the_last_capacity_tokens(loaded, hf_model):
    """evict=1, keep=0 is nanoGPT's crop: the context is always the last `capacity` tokens."""
    model, _, _ = loaded
    capacity = 12
    stream = random_ids(40, model.config.vocab_size, seed=4)
    memory = WorkingMemory(model, capacity, keep=0, evict=1)
    memory.read(stream[:1])
    steps = [memory.append(token) for token in stream[1:]]
    expected = hf_logits_after(hf_model, [stream[: i + 1][-capacity:] for i in range(1, len(stream))])
    for i, logits in enumerate(steps):
        assert_logits_equal(logits, expected[i], f"token {i + 1}")


@pytest.mark.parametrize("keep, evict", [(0, 1), (2, 3), (4, 12)], ids=lambda v: str(v))
def test_feed_all_logits_equal_per_position_forward_across_evictions(loaded, hf_model, keep, evict):
    model, _, _ = loaded
    capacity = 16
    vocab = model.config.vocab_size
    prompt = random_ids(5, vocab, seed=5)
    ids = random_ids(37, vocab, seed=6)
    memory = WorkingMemory(model, capacity, keep=keep, evict=evict)
    memory.read(prompt)
    logits = memory.feed(ids, all_logits=True)
    assert logits.shape == (len(ids), vocab)
    windows = [window_after(prompt + ids[: i + 1], capacity, keep, evict) for i in range(len(ids))]
    expected = hf_logits_after(hf_model, windows)
    for i in range(len(ids)):
        assert_logits_equal(logits[i], expected[i], f"position {i}")
    assert memory.counters.evictions > 0


def test_feed_into_an_empty_memory_equals_per_position_forward(loaded, hf_model):
    model, _, _ = loaded
    capacity, keep, evict = 10, 1, 4
    ids = random_ids(30, model.config.vocab_size, seed=7)
    memory = WorkingMemory(model, capacity, keep=keep, evict=evict)
    logits = memory.feed(ids, all_logits=True)
    windows = [window_after(ids[: i + 1], capacity, keep, evict) for i in range(len(ids))]
    expected = hf_logits_after(hf_model, windows)
    for i in range(len(ids)):
        assert_logits_equal(logits[i], expected[i], f"position {i}")
    last = memory.feed(ids[:3])
    assert_logits_equal(last, hf_last_logits(hf_model, window_after(ids + ids[:3], capacity, keep, evict)), "last only")


# --- reading a prompt longer than capacity -----------------------------------------------


@pytest.mark.parametrize("keep", [0, 4])
def test_reading_a_long_prompt_keeps_the_pinned_head_and_the_most_recent_tokens(loaded, hf_model, keep):
    model, _, _ = loaded
    capacity = 16
    prompt = random_ids(40, model.config.vocab_size, seed=8)
    memory = WorkingMemory(model, capacity, keep=keep, evict=3)
    logits, dropped = memory.read(prompt)
    expected = prompt[:keep] + prompt[len(prompt) - (capacity - keep) :]
    assert memory.tokens == expected
    assert dropped == len(prompt) - capacity
    assert memory.fill == capacity
    assert memory.counters.seen == capacity, "tokens dropped unread are not counted as seen"
    assert_logits_equal(logits, hf_last_logits(hf_model, expected), "after the long prompt")

    # the next token finds the memory full and evicts from the rolling part as usual
    logits = memory.append(11)
    after = expected[:keep] + expected[keep + 3 :] + [11]
    assert memory.tokens == after
    assert_logits_equal(logits, hf_last_logits(hf_model, after), "the token after the prompt")


def test_reading_into_a_full_memory_drops_memory_before_the_prompt(loaded, hf_model):
    model, _, _ = loaded
    capacity, keep = 16, 2
    vocab = model.config.vocab_size
    held = random_ids(10, vocab, seed=9)
    prompt = random_ids(20, vocab, seed=10)
    memory = WorkingMemory(model, capacity, keep=keep, evict=1)
    memory.read(held)
    logits, dropped = memory.read(prompt)
    # 30 tokens for 16 places: all 8 unpinned held tokens go first, then the oldest 6 of the prompt
    assert dropped == 6, "only prompt tokens never read count as dropped"
    expected = held[:keep] + prompt[6:]
    assert memory.tokens == expected
    assert memory.counters.evicted == 8
    assert_logits_equal(logits, hf_last_logits(hf_model, expected), "after the second read")


def test_reading_a_prompt_that_overflows_only_evicts_held_tokens(loaded, hf_model):
    model, _, _ = loaded
    capacity, keep = 16, 2
    vocab = model.config.vocab_size
    held = random_ids(10, vocab, seed=11)
    prompt = random_ids(10, vocab, seed=12)
    memory = WorkingMemory(model, capacity, keep=keep, evict=1)
    memory.read(held)
    logits, dropped = memory.read(prompt)
    assert dropped == 0
    expected = held[:keep] + held[keep + 4 :] + prompt
    assert memory.tokens == expected
    assert_logits_equal(logits, hf_last_logits(hf_model, expected), "after the second read")


# --- bounded forever -------------------------------------------------------------------


@pytest.mark.parametrize("keep, evict", [(0, 1), (3, 4)])
def test_generating_five_times_capacity_stays_bounded_in_the_same_kv_store(loaded, hf_model, keep, evict):
    model, tokenizer, _ = loaded
    capacity = 16
    prompt = tokenizer.encode(PROMPT)
    memory = WorkingMemory(model, capacity, keep=keep, evict=evict)
    store = memory.store
    keys, values = store.keys, store.values
    layout = (keys.data_ptr(), keys.shape, values.data_ptr(), values.shape)

    def unchanged() -> bool:
        s = memory.store
        return s is store and (s.keys.data_ptr(), s.keys.shape, s.values.data_ptr(), s.values.shape) == layout

    n = 5 * capacity
    tokens, evicted = [], 0
    for event in generate(
        memory, tokenizer, prompt, RunSettings(max_new_tokens=n, ignore_eos=True), Sampling(temperature=1.0, seed=7)
    ):
        assert memory.fill <= capacity
        assert unchanged(), "the KV store was reallocated"
        if isinstance(event, Started):
            assert event.fill <= capacity
        if isinstance(event, Token):
            assert event.fill <= capacity
            tokens.append(event.id)
            evicted += event.evicted
        if isinstance(event, Finished):
            finished = event
    assert len(tokens) == n
    assert finished.reason == "length"
    assert finished.fill <= capacity and finished.capacity == capacity
    assert finished.evicted == evicted == memory.counters.evicted
    assert memory.tokens == window_after(prompt + tokens, capacity, keep, evict)
    # the memory still tells the truth after all that rolling
    logits = memory.append(tokens[-1])
    expected = window_after(prompt + tokens + [tokens[-1]], capacity, keep, evict)
    assert_logits_equal(logits, hf_last_logits(hf_model, expected), "after 5x capacity")


def test_the_plain_matrix_path_gives_the_logits_of_transformers(tiny_dir, hf_model, monkeypatch):
    """Where oneDNN packing is not used (GPU, bfloat16, builds without it), projections
    run as `addmm` on the checkpoint's own matrices: the same contract holds."""
    from wmgen.formats import Linear
    from wmgen.model import load_model, load_tokenizer

    monkeypatch.setattr(Linear, "PACK", False)
    info, tokenizer = load_tokenizer(str(tiny_dir))
    model = load_model(info, device="cpu", dtype="float32")
    assert all(b.c_attn.packed is None for b in model.blocks)
    ids = tokenizer.encode("The lighthouse keeper climbed the stairs every evening.")
    memory = WorkingMemory(model, 64)
    logits, _ = memory.read(ids[:4])
    rows = [logits]
    for token in ids[4:]:
        rows.append(memory.append(token))
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0, 3:]
    torch.testing.assert_close(torch.stack(rows), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_batched_rows_each_get_the_logits_they_get_alone(loaded, dtype, request):
    """MemoryBatch: rows with different prompts, evicting at different steps, each see
    exactly what a WorkingMemory of their own would (in int8 too: no row's activations
    are quantized together with another's)."""
    model, tokenizer, _ = loaded
    if dtype == "int8":
        model = request.getfixturevalue("int8_model")
    assert_rows_match_alone(model, tokenizer)
