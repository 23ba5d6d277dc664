"""Edits to a live memory: forget, pin, unpin, insert, rollback and fork, in random
sequences with reads and evictions, held to the reference model's lists (tokens, pins,
counters, scores) and, after every edit, to a fresh transformers forward over the
memory's tokens. Only the slots from the first changed one on are recomputed."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import Entry
from test_memory import MODEL, VOCAB, WORDS, check_against, new_memory, reference_for, reference_logits, shapes
from wmgen.errors import UsageError
from wmgen.memory import GENERATED, INSERTED, PROMPT, WorkingMemory

ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
spans = st.tuples(st.integers(-2, 40), st.integers(-2, 40))
edits = st.lists(
    st.one_of(
        st.tuples(st.just("read"), ids),
        st.tuples(st.just("append"), st.integers(0, VOCAB - 1)),
        st.tuples(st.just("forget"), spans, st.booleans()),
        st.tuples(st.just("pin"), spans),
        st.tuples(st.just("unpin"), spans),
        st.tuples(st.just("insert"), st.integers(-1, 40), ids),
        st.tuples(st.just("undo")),
    ),
    min_size=1,
    max_size=10,
)


def span_ok(memory: WorkingMemory, start: int, stop: int) -> bool:
    return 0 <= start < stop <= memory.fill


def apply(memory: WorkingMemory, ref, op, undo: list) -> int | None:
    """Do `op` on both; the first slot it changed (None: nothing changed)."""
    kind = op[0]
    if kind == "read":
        memory.read(op[1])
        ref.read([Entry(t) for t in op[1]])
        return None  # read runs the model itself
    if kind == "append":
        memory.append(op[1])
        ref.push(Entry(op[1], GENERATED))
        return None
    if kind == "undo":
        if not undo:
            return None
        cp, then = undo.pop()
        memory.rollback(cp)
        ref.__dict__.update(copy.deepcopy(then.__dict__))
        return 0  # at most everything
    undo.append((memory.checkpoint(), copy.deepcopy(ref)))
    if kind in ("forget", "pin", "unpin"):
        (start, stop), rest = op[1], op[2:]
        bad = not span_ok(memory, start, stop)
        held = not bad and any(s.pinned for s in memory.slots[start:stop])
        if kind == "pin" and not bad:
            bad = len(set(memory.pinned) | set(range(start, stop))) > memory.capacity - memory.evict
        if kind == "forget" and held and not rest[0]:
            bad = True
        if bad:
            before = (memory.tokens, memory.pinned)
            with pytest.raises(UsageError):
                getattr(memory, kind)(start, stop, **({"pinned": rest[0]} if kind == "forget" else {}))
            assert (memory.tokens, memory.pinned) == before, "a refused edit changed the memory"
            undo.pop()
            return None
        if kind == "forget":
            assert memory.forget(start, stop, pinned=rest[0]) == stop - start
            ref.forget(start, stop)
            return start
        getattr(memory, kind)(start, stop)
        ref.set_pins(start, stop, kind == "pin")
        return None  # pins change no keys or values
    index, tokens = op[1], op[2]
    free = memory.capacity - len(memory.pinned)
    if not 0 <= index <= memory.fill or memory.fill + len(tokens) - memory.capacity > memory.fill - len(memory.pinned):
        with pytest.raises(UsageError):
            memory.insert(index, tokens)
        undo.pop()
        return None
    assert len(tokens) <= free
    memory.insert(index, tokens)
    ref.insert(index, tokens)
    return 0 if memory.counters.evictions != ref.evictions else None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shape=shapes, start=ids, ops=edits)
def test_every_edit_is_exact_and_recomputes_only_from_the_first_changed_slot(shape, start, ops):
    memory = new_memory(shape)
    ref = reference_for(memory)
    memory.read(start)
    ref.read([Entry(t) for t in start])
    undo: list = []
    for op in ops:
        apply(memory, ref, op, undo)
        assert [s.pinned for s in memory.slots] == [e.pinned for e in ref.held], f"pins differ after {op[0]}"
        stale, recomputed = memory.stale, memory.counters.recomputed
        fresh = sum(s.new for s in memory.slots[stale:])
        logits = memory.logits()
        ref.run()
        check_against(memory, ref, edited=True)
        assert memory.counters.recomputed - recomputed == max(memory.fill - stale, 1) - fresh, "recomputed more (or less) than what changed"
        assert memory.pending == 0
        torch.testing.assert_close(logits[None], reference_logits([memory.tokens]), atol=1e-4, rtol=1e-4)


def test_forgetting_a_middle_span_recomputes_from_it_and_no_earlier():
    memory = WorkingMemory(MODEL, 30, keep=2, evict=4, tokenizer=WORDS)
    memory.read(list(range(10, 30)))
    memory.forget(8, 12)
    assert memory.stale == 8 and memory.pending == 8, "the 16 slots left: 8 before the span, 8 after"
    before = memory.counters.recomputed
    logits = memory.logits()
    assert memory.counters.recomputed - before == 8
    torch.testing.assert_close(logits[None], reference_logits([memory.tokens]), atol=1e-4, rtol=1e-4)


def test_a_pinned_slot_in_the_middle_survives_any_number_of_evictions_under_every_policy():
    for policy in ("oldest", "boundary", "attention"):
        memory = WorkingMemory(MODEL, 12, keep=1, evict=3, policy=policy, tokenizer=WORDS)
        memory.read([20, 21, 22, 23, 24, 25])
        memory.pin(3, 5)  # tokens 23 and 24
        for t in range(200):
            memory.append(30 + t % 19, compute=t % 7 == 0)
        assert memory.counters.evictions > 40
        assert [memory.tokens[i] for i in memory.pinned] == [20, 23, 24], policy


def test_pins_that_leave_no_room_to_roll_are_refused_saying_what_fits():
    memory = WorkingMemory(MODEL, 10, keep=0, evict=3, tokenizer=WORDS)
    memory.read(list(range(10, 20)))
    with pytest.raises(UsageError, match="at most 7 can be pinned"):
        memory.pin(0, 8)
    assert memory.pinned == []
    memory.pin(0, 7)
    with pytest.raises(UsageError, match="pinned"):
        memory.forget(5, 9)
    assert memory.forget(5, 9, pinned=True) == 4


@pytest.mark.parametrize("start, stop", [(3, 3), (5, 2), (0, 99), (-1, 2), (True, 2), (1.0, 2)])
def test_a_bad_span_is_a_usage_error_and_changes_nothing(start, stop):
    memory = WorkingMemory(MODEL, 10, keep=0, evict=3, tokenizer=WORDS)
    memory.read([11, 12, 13, 14, 15])
    for edit in (memory.forget, memory.pin, memory.unpin):
        with pytest.raises(UsageError):
            edit(start, stop)
    assert memory.tokens == [11, 12, 13, 14, 15] and memory.pinned == []


def test_inserted_slots_start_unattended_and_surviving_slots_keep_their_scores():
    memory = WorkingMemory(MODEL, 30, keep=0, evict=4, policy="attention", tokenizer=WORDS)
    memory.read(list(range(10, 20)))
    memory.append(25)
    memory.logits()
    scores = [(s.token, s.attention, s.queries) for s in memory.slots]
    memory.insert(4, [40, 41], origin=INSERTED)
    kept = [(s.token, s.attention, s.queries) for s in memory.slots if s.origin != INSERTED]
    assert kept == scores, "an insert changed the surviving slots' scores"
    assert [(s.queries, s.origin) for s in memory.slots[4:6]] == [(0, INSERTED)] * 2


def test_a_fork_is_independent_and_needs_no_recompute():
    memory = WorkingMemory(MODEL, 20, keep=1, evict=4, tokenizer=WORDS)
    memory.read(list(range(10, 22)))
    twin = memory.fork()
    assert twin.pending == 0 and twin.tokens == memory.tokens
    torch.testing.assert_close(twin.logits(), memory.logits())
    twin.forget(2, 5)
    twin.append(30)
    assert memory.tokens == list(range(10, 22)), "editing the fork changed the original"
    torch.testing.assert_close(memory.logits()[None], reference_logits([memory.tokens]), atol=1e-4, rtol=1e-4)


def test_rollback_returns_the_memory_exactly_and_recomputes_only_what_differs():
    memory = WorkingMemory(MODEL, 20, keep=0, evict=4, tokenizer=WORDS)
    memory.read(list(range(10, 22)))
    cp = memory.checkpoint()
    memory.forget(8, 10)
    memory.append(40)
    memory.rollback(cp)
    assert memory.tokens == list(range(10, 22)) and memory.stale == 8
    torch.testing.assert_close(memory.logits()[None], reference_logits([memory.tokens]), atol=1e-4, rtol=1e-4)


def test_find_gives_the_slots_of_each_occurrence():
    memory = WorkingMemory(MODEL, 20, keep=0, evict=4, tokenizer=WORDS)
    memory.read([10, 11, 0, 12, 10, 11])  # " w10 w11. w12 w10 w11"
    assert memory.find(" w10 w11") == [(0, 2), (4, 6)]
    assert memory.find("1.") == [(1, 3)]
    assert memory.find("absent") == []


def test_a_memory_used_from_two_threads_at_once_refuses_the_second_clearly():
    memory = WorkingMemory(MODEL, 20, keep=0, evict=4, tokenizer=WORDS)
    memory.read([10, 11, 12])
    inside, release = threading.Event(), threading.Event()
    with memory.claimed():
        errors = []

        def other():
            try:
                memory.append(13)
            except UsageError as e:
                errors.append(str(e))
            inside.set()

        thread = threading.Thread(target=other)
        thread.start()
        inside.wait(10)
        thread.join(10)
    release.set()
    assert errors and "in use by another thread" in errors[0]
    assert memory.tokens == [10, 11, 12], "the refused call changed the memory"
    memory.append(13)  # free again
    assert memory.tokens[-1] == 13 and memory.slots[-1].origin == GENERATED and memory.slots[0].origin == PROMPT
