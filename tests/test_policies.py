"""The policies' rules, as properties over random slots (no model): what each drops,
and what it never drops."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from reference import Entry, Reference, ends_a_sentence
from wmgen.policies import Attention, Boundary, Oldest, Slot, make
from wmgen.window import fit

TEXTS = [" a", " word", ".", "!", "?", "\n", " end.", '."', "?)", "。", "！", "？」", '"', ")", " x.y", "", " 3.5"]


def text_of(token: int) -> str:
    return TEXTS[token % len(TEXTS)]


def token_bytes(token: int) -> bytes:
    return text_of(token).encode()


scores = st.one_of(st.just(math.inf), st.floats(0, 1), st.sampled_from([0.0, 0.25, 0.5]))  # repeats make ties


@st.composite
def memories(draw):
    """A full memory's slots and a shape: (slots, keep, evict, recent). The first
    `keep` slots are pinned, and so may be any others, as long as `evict` can roll."""
    capacity = draw(st.integers(2, 40))
    keep = draw(st.integers(0, capacity - 1))
    evict = draw(st.integers(1, capacity - keep))
    recent = draw(st.integers(0, capacity - keep - evict))
    slots = []
    for i in range(capacity):
        score = draw(scores)
        queries = 0 if math.isinf(score) else draw(st.integers(1, 9))
        slots.append(Slot(draw(st.integers(0, 200)), "generated", None, score * queries if queries else 0.0, queries, pinned=i < keep))
    spare = capacity - keep - evict  # pins beyond the head that still leave evict to roll
    for i in draw(st.lists(st.integers(keep, capacity - 1), max_size=spare, unique=True)):
        slots[i].pinned = True
    return slots, keep, evict, recent


def free(slots: list[Slot]) -> list[int]:
    return [i for i, s in enumerate(slots) if not s.pinned]


def as_entries(slots: list[Slot]) -> list[Entry]:
    return [Entry(s.token, s.origin, s.logprob, s.attention, s.queries, s.pinned) for s in slots]


@given(memories())
def test_attention_keeps_exactly_the_pinned_the_recent_and_the_best_scored_between(memory):
    slots, keep, evict, recent = memory
    drop = Attention(recent).drop(slots, evict)
    between = [i for i in free(slots) if i < len(slots) - recent]
    if evict >= len(between):
        assert drop == free(slots)[:evict], "with too few candidates, the oldest unpinned go"
        return
    lowest = sorted(between, key=lambda i: (slots[i].score, i))[:evict]
    assert drop == sorted(lowest), "the evict lowest unpinned scores before the recent tokens go, ties to the older"
    assert not any(slots[i].pinned for i in drop)
    assert not any(i >= len(slots) - recent for i in drop), "a recent token went"
    worst_kept = min((slots[i].score for i in between if i not in drop), default=math.inf)
    assert all(slots[i].score <= worst_kept for i in drop), "a kept slot between scores lower than a dropped one"


@given(memories())
def test_boundary_drops_evict_then_up_to_evict_more_and_stops_just_after_a_sentence_end(memory):
    slots, keep, evict, _ = memory
    drop = Boundary(evict, token_bytes).drop(slots, evict)
    order = free(slots)
    assert drop == order[: len(drop)], "boundary drops the oldest unpinned, in order"
    assert evict <= len(drop) <= 2 * evict
    already = ends_a_sentence(text_of(slots[order[evict - 1]].token))
    extra = order[evict : len(drop)]
    if len(drop) > evict:
        assert not already, "the oldest block already ended a sentence, yet more went"
        assert ends_a_sentence(text_of(slots[drop[-1]].token)), "the cut comes just after a sentence end"
    assert not any(ends_a_sentence(text_of(slots[i].token)) for i in extra[:-1]), "it went past an earlier boundary"
    if len(drop) == evict and not already:
        window = order[evict : 2 * evict]
        assert not any(ends_a_sentence(text_of(slots[i].token)) for i in window), "a boundary in reach was missed"


@given(memories())
def test_oldest_drops_the_oldest_unpinned_wherever_the_pins_sit(memory):
    slots, keep, evict, _ = memory
    drop = Oldest().drop(slots, evict)
    assert len(drop) == evict and not any(slots[i].pinned for i in drop)
    assert all(slots[i].pinned for i in range(drop[-1]) if i not in drop), "an older unpinned slot was kept"


@given(memories(), st.sampled_from(["oldest", "boundary", "attention"]))
def test_every_policy_agrees_with_the_reference_model(memory, policy):
    slots, keep, evict, recent = memory
    rules = make(policy, evict=evict, recent=recent, token_bytes=token_bytes)
    ref = Reference(len(slots), keep, evict, policy, recent, token_text=text_of)
    assert rules.drop(slots, evict) == ref.choose(as_entries(slots), evict)


@given(memories(), st.integers(1, 30), st.sampled_from(["oldest", "boundary", "attention"]))
def test_fit_keeps_every_pinned_slot_and_the_newest_token_and_drops_at_least_the_overflow(memory, extra, policy):
    slots, keep, evict, recent = memory
    capacity = len(slots)
    rules = make(policy, evict=evict, recent=recent, token_bytes=token_bytes)
    longer = slots + [Slot(1000 + i, "prompt") for i in range(extra)]
    kept, dropped = fit(longer, capacity, rules)
    assert len(kept) + dropped == len(longer) and len(kept) <= capacity
    assert all(any(s is k for k in kept) for s in longer if s.pinned), "a pinned slot was dropped"
    assert kept[-1] is longer[-1]
    assert [s for s in longer if any(s is k for k in kept)] == kept, "order is kept"


def test_a_cjk_full_stop_split_over_byte_tokens_ends_a_sentence_where_its_last_byte_is():
    stop = "。".encode()  # three bytes
    pieces = {1: b" word", 2: stop[:1], 3: stop[1:], 4: b" next", 5: "」".encode()}
    slots = [Slot(t, "generated") for t in (1, 1, 2, 3, 4, 4, 4)]
    assert Boundary(3, pieces.__getitem__).drop(slots, 1) == [0, 1, 2, 3]
    assert Boundary(3, pieces.__getitem__).drop(slots, 4) == [0, 1, 2, 3], "the cut already follows the stop"
    quoted = [Slot(t, "generated") for t in (1, 4, 2, 3, 5, 4)]
    assert Boundary(3, pieces.__getitem__).drop(quoted, 1) == [0, 1, 2, 3], "a closing bracket token after the stop does not end it again"


def test_unattended_slots_score_infinite_and_stay_longest():
    slots = [Slot(t, "generated", None, 0.1 * t, 1) for t in range(6)] + [Slot(9, "generated")]
    assert slots[-1].score == math.inf
    assert Attention(0).drop(slots, 6) == [0, 1, 2, 3, 4, 5]
