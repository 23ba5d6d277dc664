"""WorkingMemory invariants for every capacity/keep/evict, checked against a plain
list-based model of the eviction rule, on a GPT-2 small enough to build in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wmgen.errors import UsageError
from wmgen.gpt2 import GPT2, GPT2Config
from wmgen.memory import CONTINUED, GENERATED, PROMPT, WorkingMemory
from wmgen.window import shape

VOCAB, N_POSITIONS = 50, 32
SHAPE = dict(vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=16, n_layer=1, n_head=2)


def build_tiny():
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(**SHAPE)).eval()
    weights = {name: t.detach().clone() for name, t in hf.state_dict().items()}
    return GPT2(GPT2Config(**SHAPE), weights), hf


MODEL, HF = build_tiny()


def reference_logits(windows: list[list[int]]) -> torch.Tensor:
    """transformers' logits for the token after each window, `[len(windows), V]`, in one
    batched pass: windows are padded on the right, which causal attention never sees."""
    longest = max(map(len, windows))
    batch = torch.tensor([w + [0] * (longest - len(w)) for w in windows])
    with torch.no_grad():
        logits = HF(batch).logits
    return logits[torch.arange(len(windows)), torch.tensor([len(w) - 1 for w in windows])]


@dataclass
class Simulation:
    """The eviction rule on plain lists: each entry is (token, origin, logprob)."""

    capacity: int
    keep: int
    evict: int
    held: list = field(default_factory=list)
    stream: list = field(default_factory=list)  # every token ever offered, in order
    seen: int = 0
    evicted: int = 0
    evictions: int = 0

    def push(self, entry) -> list[int]:
        """Read one token as `append` does; the window the model then sees."""
        self.stream.append(entry[0])
        if len(self.held) == self.capacity:
            del self.held[self.keep : self.keep + self.evict]
            self.evictions += 1
            self.evicted += self.evict
        self.held.append(entry)
        self.seen += 1
        return self.tokens

    def read(self, entries) -> int:
        """Read a prompt as one block: what does not fit goes, oldest unpinned first
        (held tokens before prompt tokens); returns how many prompt tokens went unread."""
        self.stream += [e[0] for e in entries]
        combined = self.held + list(entries)
        overflow = max(0, len(combined) - self.capacity)
        from_memory = min(overflow, max(0, len(self.held) - self.keep))
        del combined[self.keep : self.keep + overflow]
        self.held = combined
        if from_memory:
            self.evictions += 1
            self.evicted += from_memory
        unread = overflow - from_memory
        self.seen += len(entries) - unread
        return unread

    @property
    def tokens(self) -> list[int]:
        return [e[0] for e in self.held]


shapes = st.integers(2, N_POSITIONS).flatmap(
    lambda capacity: st.integers(0, capacity - 1).flatmap(
        lambda keep: st.tuples(st.just(capacity), st.just(keep), st.integers(1, capacity - keep))
    )
)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)
origins = st.sampled_from([PROMPT, GENERATED, CONTINUED])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, VOCAB - 1), origins, st.booleans()),
        st.tuples(st.just("feed"), token_ids, origins, st.booleans()),  # all_logits
        st.tuples(st.just("feed-lazy"), token_ids, origins, st.just(False)),  # compute=False
        st.tuples(st.just("read"), token_ids, origins, st.just(False)),
    ),
    min_size=1,
    max_size=8,
)


def check_against(memory: WorkingMemory, sim: Simulation) -> None:
    assert memory.fill <= memory.capacity
    assert len(memory.tokens) == len(memory.origins) == len(memory.logprobs) == memory.fill
    assert list(zip(memory.tokens, memory.origins, memory.logprobs)) == sim.held, "columns out of step"
    head = min(sim.keep, len(sim.stream))
    assert memory.tokens[:head] == sim.stream[:head], "a pinned token was evicted"
    c = memory.counters
    assert c.seen == sim.seen
    assert c.evicted == sim.evicted
    assert c.evictions == sim.evictions
    assert c.evicted == c.seen - memory.fill


def run_operations(memory: WorkingMemory, sim: Simulation, ops, *, check_logits: bool) -> None:
    stamp = iter(range(1, 10**6))  # a distinct logprob per token shows where each one went
    for kind, arg, origin, flag in ops:
        if kind == "append":
            lp = float(next(stamp))
            logits = memory.append(arg, origin=origin, logprob=lp, compute=flag)
            window = sim.push((arg, origin, lp))
            expected = [window] if flag else None
        elif kind in ("feed", "feed-lazy"):
            lps = [float(next(stamp)) for _ in arg]
            compute = kind == "feed"
            logits = memory.feed(arg, origin=origin, logprobs=lps, all_logits=flag, compute=compute)
            windows = [sim.push(entry) for entry in zip(arg, [origin] * len(arg), lps)]
            expected = None if not compute else windows if flag else windows[-1:]
        else:
            logits, unread = memory.read(arg, origin=origin)
            assert unread == sim.read([(t, origin, None) for t in arg])
            expected = [sim.tokens]
        check_against(memory, sim)
        if expected is None:
            assert logits is None
        elif check_logits:
            logits = logits.reshape(len(expected), VOCAB)
            torch.testing.assert_close(logits, reference_logits(expected), atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, ops=operations)
def test_memory_follows_the_eviction_rule_for_every_shape(shape, ops):
    capacity, keep, evict = shape
    memory = WorkingMemory(MODEL, capacity, keep=keep, evict=evict)
    run_operations(memory, Simulation(capacity, keep, evict), ops, check_logits=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, ops=operations)
def test_memory_logits_equal_a_fresh_forward_over_the_simulated_window(shape, ops):
    capacity, keep, evict = shape
    memory = WorkingMemory(MODEL, capacity, keep=keep, evict=evict)
    run_operations(memory, Simulation(capacity, keep, evict), ops, check_logits=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=120))
def test_pinned_tokens_survive_eviction(shape, tokens):
    capacity, keep, evict = shape
    memory = WorkingMemory(MODEL, capacity, keep=keep, evict=evict)
    for i, token in enumerate(tokens):
        memory.append(token, compute=False)
        assert memory.fill <= capacity
        assert memory.tokens[: min(keep, i + 1)] == tokens[: min(keep, i + 1)]
        assert memory.tokens[-1] == token
    assert memory.counters.evicted == memory.counters.seen - memory.fill == len(tokens) - memory.fill


def test_recompute_after_an_eviction_covers_exactly_the_surviving_rolling_tokens():
    capacity, keep, evict = 10, 2, 3
    memory = WorkingMemory(MODEL, capacity, keep=keep, evict=evict)
    for token in range(capacity):
        memory.append(token)
    assert memory.counters.recomputed == 0, "filling up recomputes nothing"
    memory.append(capacity)
    assert memory.counters.evictions == 1
    assert memory.counters.recomputed == capacity - keep - evict


def test_the_kv_store_is_allocated_once_for_capacity():
    memory = WorkingMemory(MODEL, 12, keep=1, evict=2)
    keys = memory.store.keys
    assert keys.shape[3] == 12
    pointer = keys.data_ptr()
    memory.feed(list(range(40)), all_logits=True)
    memory.read(list(range(30)))
    assert memory.store.keys is keys and keys.data_ptr() == pointer


# --- bad shapes --------------------------------------------------------------------------


def test_capacity_above_the_model_limit_is_a_usage_error():
    with pytest.raises(UsageError, match="capacity"):
        WorkingMemory(MODEL, N_POSITIONS + 1)


def test_capacity_below_two_is_a_usage_error():
    with pytest.raises(UsageError):
        WorkingMemory(MODEL, 1, keep=0, evict=1)


@pytest.mark.parametrize("keep", [8, 9])
def test_keep_at_or_above_capacity_is_a_usage_error(keep):
    with pytest.raises(UsageError, match="keep"):
        WorkingMemory(MODEL, 8, keep=keep, evict=1)


def test_evict_more_than_the_rolling_part_is_a_usage_error():
    WorkingMemory(MODEL, 8, keep=3, evict=5)  # exactly the rolling part is fine
    with pytest.raises(UsageError, match="evict"):
        WorkingMemory(MODEL, 8, keep=3, evict=6)


def test_evict_zero_is_a_usage_error():
    with pytest.raises(UsageError, match="evict"):
        WorkingMemory(MODEL, 8, keep=0, evict=0)


def test_shape_pins_the_whole_prompt_with_keep_prompt():
    capacity, keep, evict = shape(16, "prompt", None, N_POSITIONS, prompt_tokens=5)
    assert (capacity, keep) == (16, 5)
    assert 1 <= evict <= capacity - keep


def test_shape_defaults_capacity_to_the_model_limit():
    capacity, keep, evict = shape(None, 0, None, N_POSITIONS, prompt_tokens=3)
    assert (capacity, keep) == (N_POSITIONS, 0)
    assert 1 <= evict <= capacity


def test_shape_keeps_explicit_values():
    assert shape(20, 4, 7, N_POSITIONS, prompt_tokens=9) == (20, 4, 7)


def test_keep_prompt_with_a_prompt_as_long_as_capacity_is_a_usage_error():
    with pytest.raises(UsageError, match="keep"):
        shape(16, "prompt", None, N_POSITIONS, prompt_tokens=16)


def test_shape_rejects_capacity_above_the_model_limit():
    with pytest.raises(UsageError, match="capacity"):
        shape(N_POSITIONS + 1, 0, None, N_POSITIONS, prompt_tokens=1)
