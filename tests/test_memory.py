"""WorkingMemory invariants for every shape and policy, checked against the plain-list
reference model of the rules (`tests/reference.py`) and, for attention scores,
against transformers' eager attention, on a GPT-2 small enough to build in memory."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import Entry, Reference, received_by_eager
from wmgen.errors import UsageError
from wmgen.gpt2 import GPT2, GPT2Config
from wmgen.memory import CONTINUED, GENERATED, PROMPT, WorkingMemory
from wmgen.window import shape

VOCAB, N_POSITIONS = 50, 32
SHAPE = dict(vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=16, n_layer=2, n_head=2)


def build_tiny():
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(**SHAPE)).eval()
    weights = {name: t.detach().clone() for name, t in hf.state_dict().items()}
    eager = GPT2LMHeadModel(HFConfig(**SHAPE, attn_implementation="eager")).eval()
    eager.load_state_dict(hf.state_dict())
    return GPT2(GPT2Config(**SHAPE), weights), hf, eager


MODEL, HF, EAGER = build_tiny()


def reference_logits(windows: list[list[int]]) -> torch.Tensor:
    """transformers' logits for the token after each window, `[len(windows), V]`, in one
    batched pass: windows are padded on the right, which causal attention never sees."""
    longest = max(map(len, windows))
    batch = torch.tensor([w + [0] * (longest - len(w)) for w in windows])
    with torch.no_grad():
        logits = HF(batch).logits
    return logits[torch.arange(len(windows)), torch.tensor([len(w) - 1 for w in windows])]


class Words:
    """A stand-in tokenizer for the tiny vocabulary: a few tokens end sentences or
    lines, the rest are words."""

    ENDS = {0: ".", 1: "\n", 2: '!"', 3: "?)", 4: "。", 5: '"', 6: " end.\n", 7: "!", 8: "x.y"}

    def token_text(self, t: int) -> str:
        return self.ENDS.get(t, f" w{t}")

    def token_bytes(self, t: int) -> bytes:
        return self.token_text(t).encode()


WORDS = Words()


def eager_attend(tokens: list[int], new: list[int]) -> list[float]:
    return received_by_eager(EAGER, tokens, new)


def reference_for(memory: WorkingMemory) -> Reference:
    return Reference(memory.capacity, memory.keep, memory.evict, memory.shape.policy, memory.recent,
                     token_text=WORDS.token_text, attend=eager_attend)


def shapes_for(policies: tuple[str, ...]):
    def recent_for(capacity, keep, evict):
        return st.one_of(st.none(), st.integers(0, capacity - keep - evict))

    return st.integers(2, N_POSITIONS).flatmap(
        lambda capacity: st.integers(0, capacity - 1).flatmap(
            lambda keep: st.integers(1, capacity - keep).flatmap(
                lambda evict: st.tuples(st.just(capacity), st.just(keep), st.just(evict), st.sampled_from(policies),
                                        recent_for(capacity, keep, evict))
            )
        )
    )


shapes = shapes_for(("oldest", "boundary", "attention"))
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




def check_against(memory: WorkingMemory, ref: Reference, *, edited: bool = False) -> None:
    assert memory.fill <= memory.capacity
    held = [(e.token, e.origin, e.logprob, e.pinned) for e in ref.held]
    assert [(s.token, s.origin, s.logprob, s.pinned) for s in memory.slots] == held, "the slots differ from the rule's"
    head = min(ref.keep, len(ref.stream))
    if not edited:  # an edit may forget or unpin the head, or insert before it
        assert memory.tokens[:head] == ref.stream[:head], "a pinned token was evicted"
    c = memory.counters
    assert (c.seen, c.evicted, c.evictions) == (ref.seen, ref.evicted, ref.evictions)
    if not edited:
        assert c.evicted == c.seen - memory.fill
    if memory.policy.scores:
        assert [s.queries for s in memory.slots] == [e.queries for e in ref.held]
        ours = [s.score for s in memory.slots]
        theirs = [e.score for e in ref.held]
        assert [math.isinf(x) for x in ours] == [math.isinf(x) for x in theirs]
        assert [x for x in ours if not math.isinf(x)] == pytest.approx([x for x in theirs if not math.isinf(x)], abs=1e-5)


def run_operations(memory: WorkingMemory, ref: Reference, ops, *, check_logits: bool) -> None:
    stamp = iter(range(1, 10**6))  # a distinct logprob per token shows where each one went
    for kind, arg, origin, flag in ops:
        if kind == "append":
            lp = float(next(stamp))
            logits = memory.append(arg, origin=origin, logprob=lp, compute=flag)
            window = ref.push(Entry(arg, origin, lp), compute=flag)
            expected = [window] if flag else None
        elif kind in ("feed", "feed-lazy"):
            lps = [float(next(stamp)) for _ in arg]
            compute = kind == "feed"
            logits = memory.feed(arg, origin=origin, logprobs=lps, all_logits=flag, compute=compute)
            windows = [ref.push(Entry(t, origin, lp), compute=compute) for t, lp in zip(arg, lps)]
            expected = None if not compute else windows if flag else windows[-1:]
        else:
            logits, unread = memory.read(arg, origin=origin)
            assert unread == ref.read([Entry(t, origin) for t in arg])
            expected = [ref.tokens]
        check_against(memory, ref)
        if expected is None:
            assert logits is None
        elif check_logits:
            logits = logits.reshape(len(expected), VOCAB)
            torch.testing.assert_close(logits, reference_logits(expected), atol=1e-4, rtol=1e-4)


def new_memory(shape) -> WorkingMemory:
    """A memory whose unwritten slots hold NaN: a batch-1 store is not zeroed, so a
    pass that read a slot no pass wrote would turn the logits checked here to NaN."""
    capacity, keep, evict, policy, recent = shape
    store = MODEL.new_store(capacity)
    store.keys.fill_(math.nan)
    store.values.fill_(math.nan)
    return WorkingMemory(MODEL, capacity, keep=keep, evict=evict, policy=policy, recent=recent, tokenizer=WORDS, store=store)


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, ops=operations)
def test_memory_follows_its_policy_for_every_shape(shape, ops):
    memory = new_memory(shape)
    run_operations(memory, reference_for(memory), ops, check_logits=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, ops=operations)
def test_memory_logits_equal_a_fresh_forward_over_the_reference_window(shape, ops):
    memory = new_memory(shape)
    run_operations(memory, reference_for(memory), ops, check_logits=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=120))
def test_pinned_tokens_survive_eviction(shape, tokens):
    capacity, keep, evict, _, _ = shape
    memory = new_memory(shape)
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
    capacity, keep, evict, _, _ = shape(16, "prompt", None, N_POSITIONS, prompt_tokens=5)
    assert (capacity, keep) == (16, 5)
    assert 1 <= evict <= capacity - keep


def test_shape_defaults_capacity_to_the_model_limit():
    capacity, keep, evict, _, _ = shape(None, 0, None, N_POSITIONS, prompt_tokens=3)
    assert (capacity, keep) == (N_POSITIONS, 0)
    assert 1 <= evict <= capacity


def test_shape_keeps_explicit_values():
    assert shape(20, 4, 7, N_POSITIONS, prompt_tokens=9) == (20, 4, 7, "oldest", None)
    assert shape(20, 4, 7, N_POSITIONS, policy="attention", recent=3) == (20, 4, 7, "attention", 3)


def test_recent_defaults_to_half_the_rolling_part_or_what_evict_leaves():
    assert shape(20, 4, 4, N_POSITIONS, policy="attention").recent == 8
    assert shape(20, 4, 12, N_POSITIONS, policy="attention").recent == 4
    assert shape(20, 4, 7, N_POSITIONS, policy="oldest", recent=3).recent is None, "recent is the attention policy's"


@pytest.mark.parametrize("recent", [10, 100])
def test_recent_and_evict_that_do_not_fit_are_a_usage_error_saying_what_fits(recent):
    with pytest.raises(UsageError, match="recent can be at most 9") as caught:
        shape(20, 4, 7, N_POSITIONS, policy="attention", recent=recent)
    assert caught.value.key == "recent"


def test_an_unknown_policy_is_a_usage_error_naming_the_policies():
    with pytest.raises(UsageError, match="oldest, boundary, attention"):
        WorkingMemory(MODEL, 8, policy="newest")


def test_keep_prompt_with_a_prompt_as_long_as_capacity_is_a_usage_error():
    with pytest.raises(UsageError, match="keep"):
        shape(16, "prompt", None, N_POSITIONS, prompt_tokens=16)


def test_shape_rejects_capacity_above_the_model_limit():
    with pytest.raises(UsageError, match="capacity"):
        shape(N_POSITIONS + 1, 0, None, N_POSITIONS, prompt_tokens=1)
