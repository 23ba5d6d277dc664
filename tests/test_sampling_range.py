"""Sampling takes every value the settings accept: tiny and huge temperatures, a top-p
below float32's smallest number, any top-k, repetition penalties at the ends of the
float range, logits with masked (-inf) tokens. It never produces NaN, never draws a
token of probability 0, and at temperature 0 it is the argmax."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmgen.sampling import choose, keep_top_p, new_generator, penalize_repetition, probabilities
from wmgen.settings import Sampling, coerce

F32 = torch.finfo(torch.float32)
NEG_INF = float("-inf")

# every accepted value, the edges weighted up
temperatures = st.one_of(
    st.just(0.0),
    st.sampled_from([5e-324, 1e-300, 1e-46, 1e-40, 1e-30, 1e-3, 0.7, 1.0, 2.0, 1e30, 3.5e38, 1e308, 1.7976931348623157e308]),
    st.floats(min_value=0, max_value=1e308, allow_nan=False, allow_infinity=False),
)
top_ps = st.one_of(
    st.sampled_from([1e-46, 5e-324, 1e-300, 1e-7, 0.5, 0.9, 1.0]),
    st.floats(min_value=0, max_value=1, exclude_min=True, allow_nan=False),
)
top_ks = st.one_of(st.sampled_from([0, 1, 2, 40, 2**63 - 1]), st.integers(0, 80))
penalties = st.one_of(
    st.sampled_from([5e-324, 1e-308, 1e-40, 1e-30, 0.5, 1.0, 1.3, 1e30, 1e38, 1e308, 1.7976931348623157e308]),
    st.floats(min_value=0, max_value=1e308, exclude_min=True, allow_nan=False, allow_infinity=False),
)
logit = st.one_of(
    st.floats(min_value=-30, max_value=30, width=32),
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # up to float32's largest
    st.sampled_from([0.0, -0.0, F32.max, -F32.max, F32.tiny, NEG_INF]),
)


@st.composite
def cases(draw):
    values = draw(st.lists(logit, min_size=2, max_size=64).filter(lambda xs: any(math.isfinite(x) for x in xs)))
    logits = torch.tensor(values, dtype=torch.float32)
    history = draw(st.lists(st.integers(0, len(values) - 1), max_size=2 * len(values)))
    s = Sampling(temperature=draw(temperatures), top_k=draw(top_ks), top_p=draw(top_ps),
                 repetition_penalty=draw(penalties))
    for key in ("temperature", "top_k", "top_p", "repetition_penalty"):  # the settings accept it as it is
        assert coerce(key, getattr(s, key), key) == getattr(s, key)
    return logits, history, s, draw(st.integers(0, 2**32))


def penalized_in_float64(logits: torch.Tensor, history, penalty: float) -> torch.Tensor:
    """The penalty in exact-enough arithmetic, clamped to float32's finite range."""
    x = logits.double()
    if history and penalty != 1.0:
        ids = torch.tensor(sorted(set(history)))
        seen = x[ids]
        x[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    finite = torch.isfinite(logits)
    return torch.where(finite, x.clamp(-F32.max, F32.max), x)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_probabilities_are_a_distribution_over_unmasked_tokens_for_every_accepted_setting(case):
    logits, history, s, _ = case
    probs = probabilities(logits, s, history)
    assert not probs.isnan().any(), f"NaN for {s}"
    assert (probs >= 0).all()
    assert abs(float(probs.double().sum()) - 1) < 1e-4, float(probs.double().sum())
    assert (probs[logits == NEG_INF] == 0).all(), "a masked token got probability"
    # the filters keep the most likely tokens: among survivors, more likely never gets less
    penalized = penalize_repetition(logits, history, s.repetition_penalty)
    alive = (probs > 0).nonzero().flatten()
    for i in alive:
        for j in alive:
            if penalized[i] > penalized[j]:
                assert probs[i] >= probs[j], f"token {i} outranks {j} but got less probability"


@settings(max_examples=300, deadline=None)
@given(cases())
def test_choose_returns_a_token_it_could_draw_and_the_argmax_at_temperature_0(case):
    logits, history, s, seed = case
    token = choose(logits, s, new_generator(seed, "cpu"), history)
    assert isinstance(token, int) and 0 <= token < len(logits)
    assert math.isfinite(logits[token]), "a masked token was chosen"
    assert probabilities(logits, s, history)[token] > 0, "a token of probability 0 was chosen"
    if s.temperature == 0:
        assert token == int(penalize_repetition(logits, history, s.repetition_penalty).argmax())


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_repetition_penalty_matches_float64_and_keeps_finite_logits_finite(case):
    logits, history, s, _ = case
    ours = penalize_repetition(logits, history, s.repetition_penalty)
    assert not ours.isnan().any()
    assert torch.equal(torch.isfinite(ours), torch.isfinite(logits)), "a finite logit became infinite or the reverse"
    expected = penalized_in_float64(logits, history, s.repetition_penalty)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-44)


# --- the cases the adversarial run found, at the real vocabulary size -------------------

VOCAB = 50257


def gpt2_like_logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_p_below_float32_smallest_keeps_the_most_likely_token():
    logits = gpt2_like_logits()
    for p in (1e-46, 5e-324):
        kept = keep_top_p(logits, p)
        assert torch.isfinite(kept).nonzero().flatten().tolist() == [int(logits.argmax())]
        assert choose(logits, Sampling(top_p=p), new_generator(0, "cpu")) == int(logits.argmax())


def test_a_tiny_temperature_is_greedy_without_nan():
    logits = gpt2_like_logits(1)
    for t in (5e-324, 1e-300, 1e-40):
        probs = probabilities(logits, Sampling(temperature=t))
        assert not probs.isnan().any()
        assert int(probs.argmax()) == int(logits.argmax()) and float(probs.max()) == 1.0


def test_a_huge_temperature_is_uniform_over_unmasked_tokens():
    logits = gpt2_like_logits(2)
    logits[:10] = NEG_INF
    probs = probabilities(logits, Sampling(temperature=1e308))
    assert not probs.isnan().any() and (probs[:10] == 0).all()
    torch.testing.assert_close(probs[10:], torch.full((VOCAB - 10,), 1 / (VOCAB - 10)))


def test_extreme_repetition_penalties_give_no_nan():
    logits = gpt2_like_logits(3)
    logits[5] = 0.0
    logits[6] = NEG_INF
    history = [5, 6] + list(range(100, 1100))
    for penalty in (1e308, 1e-308, 5e-324):
        for t in (0.0, 1.0):
            s = Sampling(temperature=t, repetition_penalty=penalty)
            probs = probabilities(logits, s, history)
            assert not probs.isnan().any() and probs[6] == 0
            assert choose(logits, s, new_generator(0, "cpu"), history) != 6
    # greedy with a huge penalty: a repeated token's logit is now 0 at most, below the best new one
    token = choose(logits, Sampling(temperature=0, repetition_penalty=1e308), new_generator(0, "cpu"), history)
    assert token not in history
